// CPU instruction-set dispatch, written once for every kernel.
//
// A kernel body (a function marked FASTALIGN_KERNEL_BODY, so it is inlined into its callers) is
// compiled three times: for x86-64-v4 (AVX-512: 32 vector registers, a long token loop's live
// values fit without spilling), for x86-64-v3 (AVX2 + FMA) and for the baseline the package is
// built for. isa::best<body>() returns the variant for the CPU it runs on; the CPU is asked once.
// Explicit target attributes rather than target_clones: clang has no target_clones for function
// templates, and GCC's target_clones left some template instantiations scalar.
// On other architectures every variant is the baseline.
#pragma once

#define FASTALIGN_KERNEL_BODY __attribute__((always_inline)) inline

#if defined(__x86_64__)
#define FASTALIGN_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FASTALIGN_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define FASTALIGN_TARGET_AVX512
#define FASTALIGN_TARGET_AVX2
#endif

namespace fastalign {
namespace isa {

enum Level : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// AVX-512 needs F, VL, BW and DQ; AVX2 needs FMA too.
inline Level cpu_level() {
#if defined(__x86_64__)
  static const Level level = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                              __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
                                 ? kAvx512
                                 : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kAvx2
                                                                                                     : kBaseline;
  return level;
#else
  return kBaseline;
#endif
}

template <auto Body, typename Fn = decltype(Body)>
struct Variants;

template <auto Body, typename R, typename... A>
struct Variants<Body, R (*)(A...)> {
  FASTALIGN_TARGET_AVX512 static R avx512(A... a) { return Body(a...); }
  FASTALIGN_TARGET_AVX2 static R avx2(A... a) { return Body(a...); }
  static R baseline(A... a) { return Body(a...); }
};

// The variant of Body compiled for the best instruction set this CPU has.
template <auto Body>
inline decltype(Body) best() {
  using V = Variants<Body>;
  switch (cpu_level()) {
    case kAvx512: return V::avx512;
    case kAvx2: return V::avx2;
    default: return V::baseline;
  }
}

}  // namespace isa
}  // namespace fastalign
