// Run-time CPU feature checks for the portable (zig/clang) build, included in
// every source file ahead of everything else.
//
// clang answers __builtin_cpu_supports from compiler-rt's __cpu_model, which
// zig's compiler-rt leaves all zero, so every check would say "no" and the
// AVX2 / AVX-512 kernels would never run. Here the same calls read CPUID and
// XGETBV (the OS must save the wider registers) directly.
#pragma once
#if defined(__x86_64__)
#include <cpuid.h>

#include <cstring>

namespace fastalign_portable {

inline unsigned long long xcr0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

inline bool cpu_supports(const char* name) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = (c >> 27) & 1;
  const unsigned long long xcr = osxsave ? xcr0() : 0;
  const bool avx_state = (xcr & 0x6) == 0x6;          // XMM and YMM saved
  const bool avx512_state = (xcr & 0xE6) == 0xE6;     // and opmask, ZMM
  if (!std::strcmp(name, "fma")) return avx_state && ((c >> 12) & 1);
  unsigned a7, b7, c7, d7;
  if (!__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) return false;
  if (!std::strcmp(name, "avx2")) return avx_state && ((b7 >> 5) & 1);
  if (!std::strcmp(name, "avx512f")) return avx512_state && ((b7 >> 16) & 1);
  if (!std::strcmp(name, "avx512dq")) return avx512_state && ((b7 >> 17) & 1);
  if (!std::strcmp(name, "avx512bw")) return avx512_state && ((b7 >> 30) & 1);
  if (!std::strcmp(name, "avx512vl")) return avx512_state && ((b7 >> 31) & 1);
  return false;  // a feature not listed here: the caller takes its baseline path
}

}  // namespace fastalign_portable

#define __builtin_cpu_init() ((void)0)
#define __builtin_cpu_supports(name) ::fastalign_portable::cpu_supports(name)
#endif
