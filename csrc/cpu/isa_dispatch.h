// CPU instruction-set dispatch, written once for every kernel.
//
// A kernel body (a function marked FASTALIGN_KERNEL_BODY, so it is inlined into its callers) is
// compiled three times: with AVX-512 (F, VL, BW, DQ: 32 vector registers, a long token loop's live
// values fit without spilling), with AVX2 + FMA, and for the baseline the package is built for.
// isa::best<body>() returns the variant for the CPU it runs on; the CPU is asked once.
// Explicit target attributes rather than target_clones: clang has no target_clones for function
// templates, and GCC's target_clones left some template instantiations scalar.
//
// The attributes name each feature rather than a level ("arch=x86-64-v3"): clang applies the
// command line's feature list after the attribute's CPU, and zig's clang (the portable build)
// passes every feature of its baseline target explicitly ("-avx2" among them), so an arch=
// attribute there still gives baseline code. Features named in the attribute are applied last.
// The run-time check (cpu_level) asks for exactly these features, and csrc/cpu/isa_probe.cpp
// stops the build if a compiler does not honour them.
// On other architectures every variant is the baseline.
#pragma once

#define FASTALIGN_KERNEL_BODY __attribute__((always_inline)) inline

#if defined(__x86_64__)
#define FASTALIGN_AVX512_FEATURES "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#define FASTALIGN_AVX2_FEATURES "avx2,fma"
#define FASTALIGN_TARGET_AVX512 __attribute__((target(FASTALIGN_AVX512_FEATURES)))
#define FASTALIGN_TARGET_AVX2 __attribute__((target(FASTALIGN_AVX2_FEATURES)))
#else
#define FASTALIGN_TARGET_AVX512
#define FASTALIGN_TARGET_AVX2
#endif

namespace fastalign {
namespace isa {

enum Level : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The features of FASTALIGN_AVX512_FEATURES / FASTALIGN_AVX2_FEATURES, asked of this CPU.
inline Level cpu_level() {
#if defined(__x86_64__)
  static const Level level = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                              __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                              __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
                                 ? kAvx512
                                 : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kAvx2
                                                                                                     : kBaseline;
  return level;
#else
  return kBaseline;
#endif
}

// The variants this binary carries beyond the baseline, best first, each checked by running its
// probe (csrc/cpu/isa_probe.cpp) when this CPU has the instruction set: {features, runs here}.
struct CompiledVariant {
  const char* name;
  const char* features;
  bool runs_here;
};
int compiled_variants(CompiledVariant* out, int capacity);

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
