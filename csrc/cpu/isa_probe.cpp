// Build-time proof that the dispatch's variants carry their instruction sets, and the list
// `fastalign.info` reports.
//
// Each probe is compiled with its variant's target attribute and calls intrinsics of every feature
// the attribute names. The intrinsics are always-inline functions that need those features, so a
// compiler that ignored the attribute (and would compile every kernel variant as baseline code)
// stops the build here ("requires target feature" in clang, "target specific option mismatch" in
// GCC) instead of producing a binary whose AVX2 / AVX-512 kernels are not.
#include "cpu/isa_dispatch.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastalign {
namespace isa {
namespace {

#if defined(__x86_64__)
// x * x + x through 256-bit AVX2 integer and FMA instructions: 6 for x = 2.
FASTALIGN_TARGET_AVX2 __attribute__((noinline)) float probe_avx2(float x) {
  const __m256 v = _mm256_set1_ps(x);
  const __m256i zero = _mm256_sub_epi32(_mm256_set1_epi32(1), _mm256_set1_epi32(1));  // AVX2
  const __m256 r = _mm256_add_ps(_mm256_fmadd_ps(v, v, v), _mm256_castsi256_ps(zero));  // FMA
  return _mm256_cvtss_f32(r);
}

// The same through 512-bit registers, with one instruction of each of F, VL, BW and DQ: 6 for x = 2.
FASTALIGN_TARGET_AVX512 __attribute__((noinline)) float probe_avx512(float x) {
  const __m512 v = _mm512_set1_ps(x);
  const __m512 r = _mm512_and_ps(_mm512_fmadd_ps(v, v, v), _mm512_castsi512_ps(_mm512_set1_epi32(-1)));  // F, DQ
  const __mmask64 all = _mm512_cmpeq_epi8_mask(_mm512_set1_epi8(1), _mm512_set1_epi8(1));                 // BW
  const __m256 w = _mm256_maskz_mov_ps(static_cast<__mmask8>(all), _mm256_set1_ps(x));                   // VL
  return _mm512_cvtss_f32(r) + _mm256_cvtss_f32(w) - x;
}
#endif

}  // namespace

int compiled_variants(CompiledVariant* out, int capacity) {
  int n = 0;
#if defined(__x86_64__)
  volatile float two = 2.0f;  // not folded: the probe runs
  if (n < capacity)
    out[n++] = {"avx512", FASTALIGN_AVX512_FEATURES, cpu_level() >= kAvx512 && probe_avx512(two) == 6.0f};
  if (n < capacity) out[n++] = {"avx2", FASTALIGN_AVX2_FEATURES, cpu_level() >= kAvx2 && probe_avx2(two) == 6.0f};
#else
  (void)out;
  (void)capacity;
#endif
  return n;
}

}  // namespace isa
}  // namespace fastalign
