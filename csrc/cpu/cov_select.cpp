// Clip-Cov / KL-Cov token selection (docs/math.md#clip-cov-and-kl-cov) on the CPU.
//
//   cov_t = (A_t - mean_v A) (lp_t - mean_v lp)       (means from sums[0..2] = sum A, sum lp, n)
//   clip_cov: candidates = valid, L2 <= L1 (ppo clip on exp(l)), lb < cov_t < ub;
//             pick the n = max(floor(ratio * n_local), 1) candidates with the smallest random
//             key (all of them when fewer), key = splitmix64(seed, t): a uniform random choice.
//   kl_cov:   candidates = valid; pick the top k by cov_t, ties by lower index.
// Both become "the k smallest 64-bit keys", key = (32-bit order key << 32) | flat index, so
// keys are unique and the k-th smallest is a threshold. One vectorised key pass per thread
// keeps a small buffer of keys below its running k-th key; the buffers are merged at the end. Counts (n_local) are read from memory, never
// passed from Python, so the caller never synchronises.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include <omp.h>

#include "common/cov_select_keys.h"
#include "cpu/cov_select.h"
#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

// One row's [sum_v A, sum_v lp, n] (in an order fixed by the build), in fp64 as the CUDA kernel and the torch
// path sum them (an fp32 sum moved the means by a rounding, and with them the pick among tied covariances).
FASTALIGN_KERNEL_BODY void row_sums(int64_t T, const float* __restrict lp, const float* __restrict adv,
                                    const uint8_t* __restrict mask, double* out) {
  double sa = 0.0, sl = 0.0, n = 0.0;
#pragma omp simd reduction(+ : sa, sl, n)
  for (int64_t t = 0; t < T; ++t) {
    const bool v = mask[t] != 0;
    sa += v ? static_cast<double>(adv[t]) : 0.0;
    sl += v ? static_cast<double>(lp[t]) : 0.0;
    n += v ? 1.0 : 0.0;
  }
  out[0] = sa;
  out[1] = sl;
  out[2] = n;
}

void cov_sums(int64_t B, int64_t T, uintptr_t lp_p, uintptr_t adv_p, uintptr_t mask_p, uintptr_t out_p) {
  cov_sums_rows(B, T, ptr<const float>(lp_p), ptr<const float>(adv_p), ptr<const uint8_t>(mask_p), ptr<float>(out_p));
}

}  // namespace

// Per-row partial sums in a fixed order, then rows in order: deterministic.
void cov_sums_rows(int64_t B, int64_t T, const float* lp, const float* adv, const uint8_t* mask, float* out) {
  const auto fn = isa::best<row_sums>();
  std::vector<double> part(static_cast<size_t>(B) * 3, 0.0);
#pragma omp parallel for schedule(static) num_threads(threads_for(B * T))
  for (int64_t i = 0; i < B; ++i) fn(T, lp + i * T, adv + i * T, mask + i * T, part.data() + i * 3);
  double s[3] = {0, 0, 0};
  for (int64_t i = 0; i < B; ++i)
    for (int k = 0; k < 3; ++k) s[k] += part[i * 3 + k];
  for (int k = 0; k < 3; ++k) out[k] = static_cast<float>(s[k]);
}

namespace {

// One chunk of tokens [t0, t0 + n): order keys and "may beat the current bound" flags, fp32 and
// uint32 lanes only (the uint8 mask is widened first), so the loop vectorises. Returns #hits.
constexpr int64_t kChunk = 1024;

template <int MODE>
FASTALIGN_KERNEL_BODY uint32_t chunk_keys(const CovParams& P, int64_t t0, int64_t n, const float* __restrict lp,
                                          const float* __restrict old, const float* __restrict adv,
                                          const uint8_t* __restrict mask, uint32_t bound_hi, uint32_t* __restrict ord,
                                          uint32_t* __restrict hit) {
  alignas(64) float vb[kChunk];
  for (int64_t i = 0; i < n; ++i) vb[i] = mask[t0 + i] != 0 ? 1.f : 0.f;
  uint32_t hits = 0;
#pragma omp simd reduction(+ : hits)
  for (int64_t i = 0; i < n; ++i) {
    bool cand;
    const uint32_t o = cov_order_t<MODE>(P, static_cast<uint32_t>(t0 + i), vb[i] != 0.f, lp[t0 + i], old[t0 + i],
                                         adv[t0 + i], cand);
    const uint32_t h = cand & (o <= bound_hi);
    ord[i] = o;
    hit[i] = h;
    hits += h;
  }
  return hits;
}

// One pass over the tokens, no per-token scratch: each thread walks its contiguous range in
// chunks (vectorised keys), keeps only keys below its running bound (the largest of its k
// smallest so far) in a small buffer that is cut back to the k smallest when full, then the
// per-thread winners are merged. The selection ("the k smallest unique keys") does not depend
// on the thread count. sel is cleared and the (at most k) winners are marked.
void cov_select(int64_t N, uintptr_t lp_p, uintptr_t old_p, uintptr_t adv_p, uintptr_t mask_p, uintptr_t sums_p,
                uintptr_t nloc_p, uintptr_t seed_p, int mode, double ratio, double lb, double ub, double el,
                double eh, uintptr_t sel_p) {
  uint8_t* sel = ptr<uint8_t>(sel_p);
  const float* sums = ptr<const float>(sums_p);
  CovParams P = cov_params(sums, *ptr<const float>(nloc_p), ratio, lb, ub, el, eh, mode,
                           static_cast<uint64_t>(*ptr<const int64_t>(seed_p)));
  P.mode = mode == 0 ? 0 : 1;
  if (N == 0) return;
  const float* lp = ptr<const float>(lp_p);
  const float* old = ptr<const float>(old_p);
  const float* adv = ptr<const float>(adv_p);
  const uint8_t* mask = ptr<const uint8_t>(mask_p);
  const auto keys_fn = P.mode == 0 ? isa::best<chunk_keys<0>>() : isa::best<chunk_keys<1>>();
  const int nthreads = omp_get_max_threads();
  std::vector<TopK> best(static_cast<size_t>(nthreads), TopK(P.k));
#pragma omp parallel num_threads(std::min(nthreads, threads_for(N)))
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t nchunks = (N + kChunk - 1) / kChunk;
    const int64_t c_lo = nchunks * tid / nt, c_hi = nchunks * (tid + 1) / nt;
    TopK& mine = best[tid];
    alignas(64) uint32_t ord[kChunk];
    alignas(64) uint32_t hit[kChunk];
    for (int64_t c = c_lo; c < c_hi; ++c) {
      const int64_t t0 = c * kChunk, n = std::min<int64_t>(kChunk, N - t0);
      if (keys_fn(P, t0, n, lp, old, adv, mask, mine.bound_hi(), ord, hit) != 0) mine.add_hits(ord, hit, n, t0);
    }
  }
  const std::vector<Pick> picks = k_smallest(best, P.k);
#pragma omp parallel for schedule(static) num_threads(threads_for(N))
  for (int64_t t = 0; t < N; ++t) sel[t] = 0;
  for (const Pick& p : picks) sel[p.idx] = 1;
}

}  // namespace

FASTALIGN_BINDINGS(cov_select) {
  namespace py = pybind11;
  m.def("cov_sums_cpu", &cov_sums, py::call_guard<py::gil_scoped_release>(),
        "[sum_v A, sum_v lp, n_valid] of [B, T] fp32 rows (uint8 mask), deterministic order.");
  m.def("cov_select_cpu", &cov_select, py::call_guard<py::gil_scoped_release>(),
        "Clip-Cov (mode 0) / KL-Cov (mode 1) selection mask (uint8) over N tokens; counts and the seed "
        "are read from memory.");
}

}  // namespace fastalign
