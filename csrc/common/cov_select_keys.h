// Clip-Cov / KL-Cov selection keys shared by the C++ and CUDA kernels (docs/math.md#clip-cov-and-kl-cov).
//
// Every token gets a 64-bit key; the selection is "the k smallest keys", and
// non-candidates get kNoKey (never selected). key = (order << 32) | flat index:
//   clip_cov: order = a 32-bit keyed hash of the index (seed from the generator): uniform choice
//   kl_cov:   order = ~orderable_bits(cov)  (largest cov first, ties by lower index)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"
#ifdef __CUDACC__
#define FASTALIGN_COV_EXP(x) expf(x)
#else
#include "cpu/vec_math.h"
#define FASTALIGN_COV_EXP(x) ::fastalign::exp_f32(x)
#endif

namespace fastalign {

constexpr uint64_t kNoKey = ~0ull;

FASTALIGN_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct CovParams {
  float mean_a, mean_lp, lb, ub, lo, hi;
  int64_t k;  // max(floor(ratio * n_local), 1)
  int mode;   // 0 clip_cov, 1 kl_cov
  uint32_t seed_lo, seed_hi;
};

FASTALIGN_HD CovParams cov_params(const float* sums, float n_local, double ratio, double lb, double ub, double el,
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
  const uint64_t sm = splitmix64(seed);
  p.seed_lo = static_cast<uint32_t>(sm);
  p.seed_hi = static_cast<uint32_t>(sm >> 32);
  return p;
}

// 32-bit integer hash (lowbias32): 32-bit multiplies only, so it vectorises on CPUs.
FASTALIGN_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

FASTALIGN_HD uint32_t float_order_bits(float f) {  // monotone: a < b  <=>  bits(a) < bits(b)
  f = f == 0.f ? 0.f : f;  // -0 and +0 are equal: one key, so their ties go by index
  uint32_t u;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The 32-bit order key of token idx and whether it is a candidate, for MODE 0 (clip_cov) or
// 1 (kl_cov). Written without branches and in 32-bit lanes only, so the CPU loop vectorises.
template <int MODE>
FASTALIGN_HD uint32_t cov_order_t(const CovParams& p, uint32_t idx, bool valid, float lp, float old, float a, bool& cand) {
  const float cov = (a - p.mean_a) * (lp - p.mean_lp);
  if (MODE == 0) {
    const float rho = FASTALIGN_COV_EXP(lp - old);
    const float L1 = -a * rho;
    const float rc = rho < p.lo ? p.lo : (rho > p.hi ? p.hi : rho);
    const float L2 = -a * rc;
    cand = valid & (L2 <= L1) & (cov > p.lb) & (cov < p.ub);
    // a keyed hash of the index: seed (two 32-bit halves) -> independent uniform 32-bit keys
    return hash32(hash32(idx ^ p.seed_lo) + p.seed_hi);
  }
  cand = valid & (cov == cov);  // NaN never selected
  return ~float_order_bits(cov);
}

FASTALIGN_HD uint32_t cov_order(const CovParams& p, uint32_t idx, bool valid, float lp, float old, float a, bool& cand) {
  return p.mode == 0 ? cov_order_t<0>(p, idx, valid, lp, old, a, cand) : cov_order_t<1>(p, idx, valid, lp, old, a, cand);
}

// The full 64-bit key: (order << 32) | index, or kNoKey for non-candidates.
FASTALIGN_HD uint64_t cov_key(const CovParams& p, uint64_t idx, bool valid, float lp, float old, float a) {
  bool cand;
  const uint32_t order = cov_order(p, static_cast<uint32_t>(idx), valid, lp, old, a, cand);
  const uint64_t key = (static_cast<uint64_t>(order) << 32) | (idx & 0xffffffffull);
  return cand ? key : kNoKey;
}

}  // namespace fastalign
