// Clip-Cov / KL-Cov token selection (SPEC §3.1) on the CPU.
//
//   cov_t = (A_t - mean_v A) (lp_t - mean_v lp)       (means from sums[0..2] = sum A, sum lp, n)
//   clip_cov: candidates = valid, L2 <= L1 (ppo clip on exp(l)), lb < cov_t < ub;
//             pick the n = max(floor(ratio * n_local), 1) candidates with the smallest random
//             key (all of them when fewer), key = splitmix64(seed, t): a uniform random choice.
//   kl_cov:   candidates = valid; pick the top k by cov_t, ties by lower index.
// Both become "the k smallest 64-bit keys", key = (32-bit order key << 32) | flat index, so
// keys are unique and the k-th smallest is a threshold. Per-thread nth_element over chunks,
// then one over the merged per-chunk winners. Counts (n_local) are read from memory, never
// passed from Python, so the caller never synchronises.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include <omp.h>

#include "cpu/cov_select_common.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

template <typename P>
P* as(uintptr_t p) { return reinterpret_cast<P*>(p); }

// Per-row partial sums in a fixed order, then rows in order: deterministic.
void cov_sums(int64_t B, int64_t T, uintptr_t lp_p, uintptr_t adv_p, uintptr_t mask_p, uintptr_t out_p) {
  const float* lp = as<const float>(lp_p);
  const float* adv = as<const float>(adv_p);
  const uint8_t* mask = as<const uint8_t>(mask_p);
  std::vector<double> part(static_cast<size_t>(B) * 3, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    float sa = 0.f, sl = 0.f, n = 0.f;
#pragma omp simd reduction(+ : sa, sl, n)
    for (int64_t t = 0; t < T; ++t) {
      const bool v = mask[i * T + t] != 0;
      sa += v ? adv[i * T + t] : 0.f;
      sl += v ? lp[i * T + t] : 0.f;
      n += v ? 1.f : 0.f;
    }
    part[i * 3] = sa;
    part[i * 3 + 1] = sl;
    part[i * 3 + 2] = n;
  }
  double s[3] = {0, 0, 0};
  for (int64_t i = 0; i < B; ++i)
    for (int k = 0; k < 3; ++k) s[k] += part[i * 3 + k];
  float* out = as<float>(out_p);
  for (int k = 0; k < 3; ++k) out[k] = static_cast<float>(s[k]);
}

// The key loop, compiled for AVX2+FMA and for the baseline (picked at run time).
#define FASTALIGN_KEY_LOOP                                                                             \
  _Pragma("omp parallel for simd schedule(static)")                                                 \
  for (int64_t t = 0; t < N; ++t) keys[t] = cov_key(P, static_cast<uint64_t>(t), mask[t] != 0, lp[t], old[t], adv[t]);

__attribute__((target("arch=x86-64-v3"))) void fill_keys_avx2(const CovParams& P, int64_t N,
                                                               const float* __restrict lp,
                                                               const float* __restrict old,
                                                               const float* __restrict adv,
                                                               const uint8_t* __restrict mask,
                                                               uint64_t* __restrict keys) {
  FASTALIGN_KEY_LOOP
}

void fill_keys_base(const CovParams& P, int64_t N, const float* __restrict lp, const float* __restrict old,
                    const float* __restrict adv, const uint8_t* __restrict mask, uint64_t* __restrict keys) {
  FASTALIGN_KEY_LOOP
}

void fill_keys(const CovParams& P, int64_t N, const float* lp, const float* old, const float* adv,
               const uint8_t* mask, uint64_t* keys) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) fill_keys_avx2(P, N, lp, old, adv, mask, keys);
  else fill_keys_base(P, N, lp, old, adv, mask, keys);
}

void cov_select(int64_t N, uintptr_t lp_p, uintptr_t old_p, uintptr_t adv_p, uintptr_t mask_p, uintptr_t sums_p,
                uintptr_t nloc_p, uintptr_t seed_p, int mode, double ratio, double lb, double ub, double el,
                double eh, uintptr_t keys_p, uintptr_t sel_p) {
  uint8_t* sel = as<uint8_t>(sel_p);
  uint64_t* keys = as<uint64_t>(keys_p);
  const float* sums = as<const float>(sums_p);
  CovParams P = cov_params(sums, *as<const float>(nloc_p), ratio, lb, ub, el, eh, mode,
                           static_cast<uint64_t>(*as<const int64_t>(seed_p)));
  P.mode = mode == 0 ? 0 : 1;
  if (N == 0) return;
  // 1) every token's key (kNoKey for non-candidates), vectorised
  fill_keys(P, N, as<const float>(lp_p), as<const float>(old_p), as<const float>(adv_p), as<const uint8_t>(mask_p), keys);
  // 2) the k smallest keys per thread chunk, skipping keys above the chunk's running k-th key
  const int64_t k = P.k;
  const int nthreads = omp_get_max_threads();
  std::vector<std::vector<uint64_t>> best(static_cast<size_t>(nthreads));
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = N * tid / nt, hi = N * (tid + 1) / nt;
    std::vector<uint64_t>& mine = best[tid];
    const size_t cap = static_cast<size_t>(2 * k + 64);
    mine.reserve(cap);
    uint64_t bound = kNoKey;  // keys >= bound cannot be among the chunk's k smallest
    for (int64_t t = lo; t < hi; ++t) {
      const uint64_t key = keys[t];
      if (key >= bound) continue;
      mine.push_back(key);
      if (mine.size() >= cap) {
        std::nth_element(mine.begin(), mine.begin() + (k - 1), mine.end());
        mine.resize(static_cast<size_t>(k));
        bound = *std::max_element(mine.begin(), mine.end()) + 1;
      }
    }
  }
  std::vector<uint64_t> merged;
  for (auto& v : best) merged.insert(merged.end(), v.begin(), v.end());
  uint64_t thr = 0;
  const bool any = !merged.empty();
  if (any) {
    const int64_t kk = std::min<int64_t>(k, static_cast<int64_t>(merged.size()));
    std::nth_element(merged.begin(), merged.begin() + (kk - 1), merged.end());
    thr = merged[kk - 1];
  }
  // 3) mark: keys are unique, so "key <= k-th key" picks exactly min(k, #candidates)
  const uint64_t lim = any ? thr : 0;
#pragma omp parallel for simd schedule(static)
  for (int64_t t = 0; t < N; ++t) sel[t] = static_cast<uint8_t>(any & (keys[t] != kNoKey) & (keys[t] <= lim));
}

}  // namespace

FASTALIGN_BINDINGS(cov_select) {
  namespace py = pybind11;
  m.def("cov_sums_cpu", &cov_sums, py::call_guard<py::gil_scoped_release>(),
        "[sum_v A, sum_v lp, n_valid] of [B, T] fp32 rows (uint8 mask), deterministic order.");
  m.def("cov_select_cpu", &cov_select, py::call_guard<py::gil_scoped_release>(),
        "Clip-Cov (mode 0) / KL-Cov (mode 1) selection mask (uint8) over N tokens; keys is uint64 [N] "
        "scratch; counts and the seed are read from memory.");
}

}  // namespace fastalign
