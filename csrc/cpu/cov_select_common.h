// Clip-Cov / KL-Cov selection keys shared by the C++ and CUDA kernels (SPEC §3.1).
//
// Every token gets a 64-bit key; the selection is "the k smallest keys", and
// non-candidates get kNoKey (never selected). key = (order << 32) | flat index:
//   clip_cov: order = 32 random bits of splitmix64(seed + index) (uniform choice)
//   kl_cov:   order = ~orderable_bits(cov)  (largest cov first, ties by lower index)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fastalign {

constexpr uint64_t kNoKey = ~0ull;

struct CovParams {
  float mean_a, mean_lp, lb, ub, lo, hi;
  int64_t k;  // max(floor(ratio * n_local), 1)
  int mode;   // 0 clip_cov, 1 kl_cov
  uint64_t seed;
};

FA_HD CovParams cov_params(const float* sums, float n_local, double ratio, double lb, double ub, double el,
                           double eh, int mode, uint64_t seed) {
  CovParams p;
  const float n = sums[2] > 1.f ? sums[2] : 1.f;
  p.mean_a = sums[0] / n;
  p.mean_lp = sums[1] / n;
  p.lb = static_cast<float>(lb);
  p.ub = static_cast<float>(ub);
  p.lo = static_cast<float>(1.0 - el);
  p.hi = static_cast<float>(1.0 + eh);
  const double kf = floor(ratio * static_cast<double>(n_local));
  p.k = kf < 1.0 ? 1 : static_cast<int64_t>(kf);
  p.mode = mode;
  p.seed = seed;
  return p;
}

FA_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

FA_HD uint32_t float_order_bits(float f) {  // monotone: a < b  <=>  bits(a) < bits(b)
  uint32_t u;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

FA_HD uint64_t cov_key(const CovParams& p, uint64_t idx, bool valid, float lp, float old, float a) {
  if (!valid) return kNoKey;
  const float cov = (a - p.mean_a) * (lp - p.mean_lp);
  uint32_t order;
  if (p.mode == 0) {
    const float rho = expf(lp - old);
    const float L1 = -a * rho;
    const float rc = rho < p.lo ? p.lo : (rho > p.hi ? p.hi : rho);
    const float L2 = -a * rc;
    if (!(L2 <= L1 && cov > p.lb && cov < p.ub)) return kNoKey;
    order = static_cast<uint32_t>(splitmix64(p.seed ^ (idx * 0xd1342543de82ef95ull)) >> 32);
  } else {
    if (cov != cov) return kNoKey;  // NaN never selected
    order = ~float_order_bits(cov);
  }
  return (static_cast<uint64_t>(order) << 32) | (idx & 0xffffffffull);
}

}  // namespace fastalign
