// Clip-Cov / KL-Cov in one call on the CPU (docs/math.md#clip-cov-and-kl-cov): covariance sums,
// then ONE pass over the rows that computes the loss and gradient with nothing picked while
// collecting the selection candidates, then a fix-up of the few chunks that hold picked tokens.
//
//   1. [sum_v A, sum_v lp, n] (cov_sums_rows, or given: all-reduced sums) -> CovParams.
//   2. rows (OpenMP, static ranges): per chunk of kChunk tokens, chunk_body in scan mode writes
//      d(row loss)/d(lp) and the chunk's sums parts[i, chunk, :], plus each token's 64-bit
//      selection key (common/cov_select_keys.h). Each thread keeps only keys below its running
//      bound (TopK, cpu/cov_select.h).
//   3. merge: the k smallest keys over all threads (unique keys: independent of the thread count).
//   4. every chunk holding a pick is recomputed with its selection row (same code as the plain
//      path), which rewrites its gradient and replaces its sums; rows sum their chunks in order.
// Results are bitwise those of cov_select + policy_loss_fwd (same chunking, same sums order).
#pragma GCC optimize("no-tree-sink")  // keeps the token loop vectorised: see policy_loss_rows.h
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
#include "cpu/policy_loss.h"
#include "cpu/policy_loss_rows.h"
#include "registry.h"

namespace fastalign {
namespace policy {
namespace {

struct CovScanArgs {
  const Cfg* c;
  const Inputs* in;
  const CovParams* P;
  int64_t i0, i1;   // rows of this thread
  TopK* top;
  float* parts;     // [B, nchunks, kPartCols]
  RowCtx* ctxs;     // [B]
  float* scratch;   // [kChunk] gradient sink when d(lp) is not wanted
};

template <int LT, int FL, int SM>
FASTALIGN_KERNEL_BODY void cov_scan_body(const CovScanArgs& a) {
  const Cfg& c = *a.c;
  const int64_t T = c.T, nch = (T + kChunk - 1) / kChunk;
  alignas(64) uint32_t ord[kChunk];
  alignas(64) uint32_t hit[kChunk];
  ScanOut so{*a.P, 0u, ord, hit};
  TopK& top = *a.top;
  for (int64_t i = a.i0; i < a.i1; ++i) {
    const Row R = a.in->at(i);
    const RowCtx x = row_stats<LT, FL>(c, R);
    a.ctxs[i] = x;
    float t[kRowCols] = {};
    for (int64_t ci = 0; ci < nch; ++ci) {
      const int64_t t0 = ci * kChunk, n = T - t0 < kChunk ? T - t0 : kChunk;
      so.bound_hi = top.bound_hi();
      float* part = a.parts + (i * nch + ci) * kPartCols;
      const int64_t flat = i * T + t0;
      const uint32_t nh = chunk_body<LT, FL, SM>(c, R, x, t0, n, R.dlp ? R.dlp + t0 : a.scratch, part,
                                                 static_cast<uint32_t>(flat), &so);
      for (int j = 0; j < kRowCols; ++j) t[j] += part[j];
      if (nh != 0) top.add_hits(ord, hit, n, flat);
    }
    t[0] += x.gmpo_row;
    for (int j = 0; j < kRowCols; ++j) R.out[j] = t[j];
  }
}

struct CovFixArgs {
  const Cfg* c;
  const Inputs* in;
  int64_t i, ci;          // row and chunk to recompute
  const RowCtx* x;
  const uint8_t* selrow;  // [T] selection of row i
  float* parts;
  float* scratch;
};

template <int LT, int FL>
FASTALIGN_KERNEL_BODY void cov_fix_body(const CovFixArgs& a) {
  const Cfg& c = *a.c;
  const int64_t T = c.T, nch = (T + kChunk - 1) / kChunk;
  Row R = a.in->at(a.i);
  R.sel = a.selrow;
  const int64_t t0 = a.ci * kChunk, n = T - t0 < kChunk ? T - t0 : kChunk;
  chunk_body<LT, FL, kSelMask>(c, R, *a.x, t0, n, R.dlp ? R.dlp + t0 : a.scratch,
                               a.parts + (a.i * nch + a.ci) * kPartCols, 0, nullptr);
}

using CovScanFn = void (*)(const CovScanArgs&);
using CovFixFn = void (*)(const CovFixArgs&);

struct CovFns {
  CovScanFn scan;
  CovFixFn fix;
};

template <int LT, int FL>
CovFns cov_fns() {
  constexpr int SM = LT == kCLIPCOV ? kScanClip : kScanKL;
  return CovFns{isa::best<cov_scan_body<LT, FL, SM>>(), isa::best<cov_fix_body<LT, FL>>()};
}

template <int LT>
CovFns cov_fns_for(int flags) {
  switch (flags) {
    case 0: return cov_fns<LT, 0>();
    case 1: return cov_fns<LT, 1>();
    case 2: return cov_fns<LT, 2>();
    case 3: return cov_fns<LT, 3>();
    case 4: return cov_fns<LT, 4>();
    case 5: return cov_fns<LT, 5>();
    case 6: return cov_fns<LT, 6>();
    case 7: return cov_fns<LT, 7>();
    case 17: return cov_fns<LT, 17>();
    case 19: return cov_fns<LT, 19>();
    case 21: return cov_fns<LT, 21>();
    default: return cov_fns<LT, 23>();
  }
}

// The row sums of policy_loss_cov_fwd (steps 1-4 above).
void cov_fwd_rows(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t ref,
                  uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t cov, uintptr_t seed, uintptr_t row,
                  uintptr_t dlp, const Cfg& c) {
  const int loss_type = c.loss_type, rollout = c.rollout;
  if (B == 0) return;
  const NeutralRows neutral(T);
  const Inputs in{T, ptr<const float>(lp), ptr<const float>(old), ptr<const float>(adv), ptr<const float>(ref),
                  ptr<const float>(ent), ptr<const float>(roll), ptr<const float>(keep), nullptr,
                  ptr<const uint8_t>(mask), nullptr, ptr<float>(row), ptr<float>(dlp), neutral.zeros.data(),
                  neutral.ones.data(), neutral.no_sel.data()};

  // 1. covariance means and the selection parameters
  float s[4];
  if (cov) {
    const float* cv = ptr<const float>(cov);
    for (int j = 0; j < 4; ++j) s[j] = cv[j];
  } else {
    cov_sums_rows(B, T, in.lp, in.adv, in.mask, s);
    s[3] = s[2];
  }
  const int mode = loss_type == kCLIPCOV ? 0 : 1;
  const CovParams P = cov_params(s, s[3], c.cov_ratio, c.cov_lb, c.cov_ub, c.eps_low, c.eps_high, mode,
                                 static_cast<uint64_t>(*ptr<const int64_t>(seed)));
  const bool seq_w = rollout == kSeqTrunc || rollout == kSeqMask || std::isfinite(c.offpolicy_threshold);
  const int flags = (ref ? kFlagKL : 0) | ((rollout == kTokTrunc || rollout == kTokMask) ? kFlagTokRoll : 0) |
                    ((!keep && !ent && !seq_w) ? kFlagPlain : 0) | ((ref && c.kl_rho != kKLRhoOff) ? kFlagKLRho : 0);
  const CovFns fns = loss_type == kCLIPCOV ? cov_fns_for<kCLIPCOV>(flags) : cov_fns_for<kKLCOV>(flags);

  // 2. loss and gradient with nothing picked + candidates, one pass
  const int64_t nch = (T + kChunk - 1) / kChunk;
  std::vector<float> parts(static_cast<size_t>(B * nch * kPartCols));
  std::vector<RowCtx> ctxs(static_cast<size_t>(B));
  const int nthreads = omp_get_max_threads();
  std::vector<TopK> tops(static_cast<size_t>(nthreads), TopK(P.k));
#pragma omp parallel num_threads(std::min(nthreads, threads_for(B * T)))
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    alignas(64) float scratch[kChunk];
    const CovScanArgs a{&c, &in, &P, B * tid / nt, B * (tid + 1) / nt, &tops[tid], parts.data(), ctxs.data(),
                        scratch};
    fns.scan(a);
  }

  // 3. the k smallest keys over all threads, in index order
  std::vector<Pick> picks = k_smallest(tops, P.k);
  const int64_t kk = static_cast<int64_t>(picks.size());
  if (kk == 0) return;
  std::sort(picks.begin(), picks.end(), [](const Pick& x, const Pick& y) { return x.idx < y.idx; });

  // 4. recompute the chunks that hold picks, then re-sum their rows
  std::vector<int64_t> gstart;  // picks[gstart[g] .. gstart[g + 1]) share one chunk
  std::vector<int64_t> rows_hit;
  int64_t prev_chunk = -1;
  for (int64_t j = 0; j < kk; ++j) {
    const int64_t i = picks[j].idx / T, ch = i * nch + (picks[j].idx - i * T) / kChunk;
    if (ch != prev_chunk) gstart.push_back(j);
    if (rows_hit.empty() || rows_hit.back() != i) rows_hit.push_back(i);
    prev_chunk = ch;
  }
  const int64_t ngroups = static_cast<int64_t>(gstart.size());
  gstart.push_back(kk);
#pragma omp parallel num_threads(std::min<int64_t>(nthreads, ngroups)) if (ngroups > 8)  // a few chunks: no thread wake-up
  {
    std::vector<uint8_t> selrow(static_cast<size_t>(T), 0);
    alignas(64) float scratch[kChunk];
#pragma omp for schedule(static)
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t i = picks[gstart[g]].idx / T;
      for (int64_t j = gstart[g]; j < gstart[g + 1]; ++j) selrow[picks[j].idx - i * T] = 1;
      const CovFixArgs a{&c, &in, i, (picks[gstart[g]].idx - i * T) / kChunk, &ctxs[i], selrow.data(),
                         parts.data(), scratch};
      fns.fix(a);
      for (int64_t j = gstart[g]; j < gstart[g + 1]; ++j) selrow[picks[j].idx - i * T] = 0;
    }
  }
  for (const int64_t i : rows_hit) {
    float t[kRowCols] = {};
    for (int64_t ci = 0; ci < nch; ++ci)
      for (int j = 0; j < kRowCols; ++j) t[j] += parts[(i * nch + ci) * kPartCols + j];
    t[0] += ctxs[i].gmpo_row;
    float* out = in.row + i * kRowCols;
    for (int j = 0; j < kRowCols; ++j) out[j] = t[j];
  }
}

}  // namespace

void policy_loss_cov_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask,
                         uintptr_t ref, uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t cov, uintptr_t seed,
                         uintptr_t row, uintptr_t dlp, uintptr_t ext, const std::vector<double>& params) {
  const Cfg c = make_cfg(params, "policy_loss_cov_fwd_cpu", B, T, false);
  if (c.loss_type != kCLIPCOV && c.loss_type != kKLCOV)
    throw std::invalid_argument("policy_loss_cov_fwd_cpu: loss type must be clip_cov or kl_cov");
  cov_fwd_rows(B, T, lp, old, adv, mask, ref, ent, roll, keep, cov, seed, row, dlp, c);
  clip_extremes(B, ptr<const float>(row), ptr<float>(ext));
}

}  // namespace policy
}  // namespace fastalign
