// Policy-gradient losses of docs/math.md#policy-losses with the added terms, fused, on the CPU.
//
// One row (sequence) i at a time, OpenMP over rows. Per token t (fp32, v = mask):
//   l = lp - old,  rho = exp(clamp(l, -20, 20))
//   pg_t, dpg_t           the loss-type row of the table below and its d/d(lp)
//   w_t = w_tok_t * w_row  detached weights: rollout correction, entropy-quantile
//                          keep mask, sequence off-policy mask
//   L_t  = w_t pg_t + kl_coef KL_t - ent_coef H_t
//   dlp_t = v (w_t dpg_t + kl_coef dKL_t),   dH_t = -v ent_coef
// Sequence-level quantities (gspo's s_i, gmpo's means, sequence rollout weights,
// the off-policy mask) come from a first pass over the row. Outputs per row
// (fixed-order sums, so bitwise deterministic):
//   row[i, :] = [sum v L, n, #clipped, #dual-clipped, sum v(-l), sum v KL, sum v H, #selected]
// and the per-token d(row loss)/d(lp), d/d(H); the aggregation (docs/math.md#aggregation) is a
// weighted sum of row losses done by the caller, and backward only scales dlp by
// the upstream gradient of each row.
//
// Loss types (LT):
//   ppo      L1 = -A min(rho, delta), L2 = -A clip(rho, 1-el, 1+eh), max(L1, L2) (L2 only if
//            strictly larger), dual clip min(., -cA) for A < 0 (only if strictly larger)
//   gspo     rho = exp(min(mean_v l, 10)) per row (gradient d rho/d lp_t = rho), ppo clip
//   cispo    -sg(clip(rho, lo, hi)) A lp
//   sapo     -(4/tau) sigma(tau (rho - 1)) A, tau = tau_pos if A > 0 else tau_neg
//   reinforce -A lp
//   gmpo     c_t = A > 0 ? min(l, eh) : A < 0 ? max(l, -el) : 0;
//            row loss -exp(mean_v c) mean_v A times sum_t v w_tok_t
//   clip_cov ppo clip on exp(l) (no clamps, no dual clip), selected tokens' pg set to 0
//   kl_cov   -A exp(l) + cov_kl_coef |l| on selected tokens
// GCC sinks the loads of optional inputs into the masked branch, which leaves conditional
// (possibly trapping) loads that if-conversion rejects and the token loop stays scalar.
// Without load sinking the whole per-token body becomes straight-line SIMD code.
#pragma GCC optimize("no-tree-sink")
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include <omp.h>
#include <pybind11/stl.h>

#include "cpu/cov_select_common.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

enum LossType : int { kPPO = 0, kGSPO, kCISPO, kSAPO, kREINFORCE, kGMPO, kCLIPCOV, kKLCOV };
enum KLType : int { kK1 = 0, kAbs, kK2, kK3 };
enum Rollout : int { kRollNone = 0, kTokTrunc, kTokMask, kSeqTrunc, kSeqMask };

constexpr int kRowCols = 8;

struct Cfg {
  int64_t B, T;
  int kl_type;
  bool kl_on, kl_straight, kl_clamp, kl_rho, ent_on, dH_on;
  int rollout;
  float el, eh, dual_c, delta, cis_lo, cis_hi, tau_pos, tau_neg;
  float kl_coef, ent_coef, r_min, r_max, offpol_thr, cov_kl;
};

static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }


// One row's inputs (absent optional inputs point at a row of neutral values).
struct Row {
  const float *lp, *old, *adv, *ref, *ent, *roll, *keep;
  const uint8_t *mask, *sel;
  float *out, *dlp, *dH;
};

// Flags (compile time, so the token loop has no branches and vectorises).
// kFlagPlain (Clip-Cov / KL-Cov path only): no keep mask, no entropy, row weight 1, so the token
// loop reads neither neutral row.
enum Flag : int { kFlagKL = 1, kFlagDH = 2, kFlagTokRoll = 4, kFlagPlain = 8 };

// Row-level quantities from pass 1 that the token loop needs.
struct RowCtx {
  float w_row, gspo_rho, gmpo_G, gmpo_row;
};

// ---- pass 1: per-row sums (only what the configuration needs) ----
template <int LT, int FL>
__attribute__((always_inline)) inline RowCtx row_stats(const Cfg& c, const Row& R) {
  const int64_t T = c.T;
  const float* __restrict lp = R.lp;
  const float* __restrict old = R.old;
  const float* __restrict adv = R.adv;
  const float* __restrict roll = R.roll;
  const float* __restrict keep = R.keep;
  const uint8_t* __restrict mask = R.mask;
  const bool tok_roll = c.rollout == kTokTrunc || c.rollout == kTokMask;
  const bool roll_trunc = c.rollout == kTokTrunc || c.rollout == kSeqTrunc;
  const bool seq_roll = c.rollout == kSeqTrunc || c.rollout == kSeqMask;
  float n1 = 0.f, sl = 0.f, slr = 0.f, sc = 0.f, sa = 0.f, sw = 0.f;
  const bool need1 = LT == kGSPO || LT == kGMPO || seq_roll || std::isfinite(c.offpol_thr);
  if (need1) {
#pragma omp simd reduction(+ : n1, sl, slr, sc, sa, sw)
    for (int64_t t = 0; t < T; ++t) {
      const bool v = mask[t] != 0;
      const float l = lp[t] - old[t];
      const float a = adv[t];
      const float lr = old[t] - roll[t];
      const float r = exp_f32(clampf(lr, -20.f, 20.f));
      float wt = roll_trunc ? (r > c.r_max ? c.r_max : r) : ((r >= c.r_min && r <= c.r_max) ? r : 0.f);
      wt = (tok_roll ? wt : 1.f) * keep[t];
      const float ct = a > 0.f ? (l > c.eh ? c.eh : l) : (a < 0.f ? (l < -c.el ? -c.el : l) : 0.f);
      n1 += v ? 1.f : 0.f;
      sl += v ? l : 0.f;
      slr += v ? lr : 0.f;
      sc += v ? ct : 0.f;
      sa += v ? a : 0.f;
      sw += v ? wt : 0.f;
    }
  }
  const float inv_n = 1.f / (n1 > 1.f ? n1 : 1.f);
  RowCtx x{1.f, 0.f, 0.f, 0.f};
  if (seq_roll) {
    const float Rw = std::exp(clampf(slr, -20.f, 20.f));
    x.w_row = roll_trunc ? (Rw > c.r_max ? c.r_max : Rw) : ((Rw >= c.r_min && Rw <= c.r_max) ? Rw : 0.f);
  }
  if (std::isfinite(c.offpol_thr) && sa * inv_n < 0.f && -sl * inv_n > c.offpol_thr) x.w_row = 0.f;
  x.gspo_rho = LT == kGSPO ? std::exp(std::fmin(sl * inv_n, 10.f)) : 0.f;
  if (LT == kGMPO && n1 > 0.f) {
    const float seq = -std::exp(sc * inv_n) * (sa * inv_n);
    x.gmpo_row = x.w_row * sw * seq;
    x.gmpo_G = x.gmpo_row * inv_n;  // times dc_t
  }
  return x;
}

// How a chunk learns which tokens Clip-Cov / KL-Cov picked:
//   kSelMask: from the uint8 selection row R.sel (none picked when it is the neutral row);
//   kScanClip / kScanKL: none picked yet; the chunk also writes each token's 32-bit order key
//   (cov_select_common.h) and whether it is a candidate that may beat the caller's bound.
enum SelMode : int { kSelMask = 0, kScanClip = 1, kScanKL = 2 };

// Tokens per chunk: the uint8 mask and selection are widened to fp32 one chunk at a time, so the
// token loop works on fp32 only (a uint8 operand makes the vectoriser pick 16+ lanes and spill).
constexpr int64_t kChunk = 512;

struct ScanOut {
  CovParams P;        // covariance means and selection parameters
  uint32_t bound_hi;  // order keys above this cannot be picked
  uint32_t* ord;      // [kChunk] order keys
  uint32_t* hit;      // [kChunk] 1 = candidate with order key <= bound_hi
};

// ---- pass 2 on tokens [t0, t0 + n) of a row: per-token loss, gradients and the chunk's metric
// sums part[0..7] = [sum v L, n, #clipped, #dual-clipped, sum v(-l), sum v KL, sum v H, #selected]
// (without the row-level gmpo term). d(row loss)/d(lp) goes to c_dlp[0..n), d/dH to R.dH.
// Returns the number of hits in scan modes.
template <int LT, int FL, int SM>
__attribute__((always_inline)) inline uint32_t chunk_body(const Cfg& c, const Row& R, const RowCtx& x, int64_t t0,
                                                          int64_t n, float* __restrict c_dlp, float* part,
                                                          uint32_t flat0, const ScanOut* scan) {
  constexpr bool KL = (FL & kFlagKL) != 0, DH = (FL & kFlagDH) != 0, TOKROLL = (FL & kFlagTokRoll) != 0;
  constexpr bool PLAIN = (FL & kFlagPlain) != 0;
  constexpr bool SCAN = SM != kSelMask;
  // configuration in locals: the stores below cannot alias it
  const float el = c.el, eh = c.eh, cis_lo = c.cis_lo, cis_hi = c.cis_hi;
  const float tau_pos = c.tau_pos, tau_neg = c.tau_neg, kl_coef = c.kl_coef, ent_coef = c.ent_coef;
  const float r_min = c.r_min, r_max = c.r_max, cov_kl = c.cov_kl;
  const int rollout = c.rollout;
  const bool kl_clamp = c.kl_clamp;
  const float w_k1 = c.kl_type == kK1, w_abs = c.kl_type == kAbs, w_k2 = c.kl_type == kK2, w_k3 = c.kl_type == kK3;
  const float w_st = c.kl_straight ? 1.f : 0.f, w_rho = c.kl_rho ? 1.f : 0.f;
  const float w_row = PLAIN ? 1.f : x.w_row, gspo_rho = x.gspo_rho, gmpo_G = x.gmpo_G;
  const float lo = 1.f - c.el, hi = 1.f + c.eh;
  // Options off become bounds that never bind (no runtime branches in the loop, so it vectorises).
  constexpr float kBig = std::numeric_limits<float>::max();
  const float delta_b = (LT == kPPO && c.delta > 0.f) ? c.delta : kBig;
  const float dual_b = (LT == kPPO && c.dual_c > 0.f) ? c.dual_c : kBig;
  const float xlo = kl_clamp ? -20.f : -kBig, xhi = kl_clamp ? 20.f : kBig;
  const float klo = kl_clamp ? -10.f : -kBig, khi = kl_clamp ? 10.f : kBig;
  const float w_trunc = rollout == kTokTrunc ? 1.f : 0.f;
  CovParams P{};
  uint32_t bound_hi = 0;
  uint32_t* __restrict ord = nullptr;
  uint32_t* __restrict hit = nullptr;
  if (SCAN) {
    P = scan->P;
    bound_hi = scan->bound_hi;
    ord = scan->ord;
    hit = scan->hit;
  }
  alignas(64) float vb[kChunk];
  alignas(64) float sb[kChunk];
  const uint8_t* __restrict mask = R.mask + t0;
  const uint8_t* __restrict sel = R.sel + t0;
  for (int64_t t = 0; t < n; ++t) vb[t] = mask[t] != 0 ? 1.f : 0.f;
  if (!SCAN)
    for (int64_t t = 0; t < n; ++t) sb[t] = sel[t] != 0 ? 1.f : 0.f;
  const float* __restrict c_lp = R.lp + t0;
  const float* __restrict c_old = R.old + t0;
  const float* __restrict c_adv = R.adv + t0;
  const float* __restrict c_ref = R.ref + t0;
  const float* __restrict c_ent = R.ent + t0;
  const float* __restrict c_roll = R.roll + t0;
  const float* __restrict c_keep = R.keep + t0;
  float* __restrict c_dH = DH ? R.dH + t0 : nullptr;
  float s_loss = 0.f, s_n = 0.f, s_clip = 0.f, s_low = 0.f, s_negl = 0.f, s_kl = 0.f, s_H = 0.f, s_sel = 0.f;
  uint32_t hits = 0;
#pragma omp simd reduction(+ : s_loss, s_n, s_clip, s_low, s_negl, s_kl, s_H, s_sel, hits)
  for (int64_t t = 0; t < n; ++t) {
    const bool v = vb[t] != 0.f;
    const float x_lp = c_lp[t], a = c_adv[t];
    const float l = x_lp - c_old[t];
    const float rho_c = exp_f32(clampf(l, -20.f, 20.f));
    const float drho_c = (l >= -20.f & l <= 20.f) ? rho_c : 0.f;
    const float sbt = SCAN ? 0.f : sb[t];
    const bool picked = sbt != 0.f;
    if (SCAN) {
      bool cand;
      const uint32_t o = cov_order_t<SM == kScanClip ? 0 : 1>(P, flat0 + static_cast<uint32_t>(t), v, x_lp,
                                                              c_old[t], a, cand);
      const uint32_t h = cand & (o <= bound_hi);
      ord[t] = o;
      hit[t] = h;
      hits += h;
    }
    float pg = 0.f, dpg = 0.f, clip = 0.f, low = 0.f;
    if (LT == kPPO | LT == kGSPO | LT == kCLIPCOV) {
      float rho = rho_c, drho = drho_c;
      if (LT == kGSPO) { rho = gspo_rho; drho = gspo_rho; }
      if (LT == kCLIPCOV) { rho = exp_f32(l); drho = rho; }
      float r1 = rho, dr1 = drho;
      if (LT == kPPO) {
        r1 = rho > delta_b ? delta_b : rho;
        dr1 = rho > delta_b ? 0.f : drho;
      }
      const float L1 = -a * r1;
      const float L2 = -a * clampf(rho, lo, hi);
      const float dL2 = (rho >= lo & rho <= hi) ? -a * drho : 0.f;
      const bool is_clip = L2 > L1;
      pg = is_clip ? L2 : L1;
      dpg = is_clip ? dL2 : -a * dr1;
      clip = is_clip ? 1.f : 0.f;
      if (LT == kPPO) {
        const float L3 = -dual_b * a;
        const bool is_low = a < 0.f & pg > L3;
        pg = is_low ? L3 : pg;
        dpg = is_low ? 0.f : dpg;
        low = is_low ? 1.f : 0.f;
      }
      if (LT == kCLIPCOV) {
        pg = picked ? 0.f : pg;
        dpg = picked ? 0.f : dpg;
      }
    } else if (LT == kKLCOV) {
      const float rho = exp_f32(l);
      pg = -a * rho + (picked ? cov_kl * std::fabs(l) : 0.f);
      dpg = -a * rho + (picked ? cov_kl * (l > 0.f ? 1.f : (l < 0.f ? -1.f : 0.f)) : 0.f);
    } else if (LT == kCISPO) {
      const float w = clampf(rho_c, cis_lo, cis_hi);
      pg = -w * a * x_lp;
      dpg = -w * a;
      clip = (rho_c < cis_lo | rho_c > cis_hi) ? 1.f : 0.f;
    } else if (LT == kSAPO) {
      const float tau = a > 0.f ? tau_pos : tau_neg;
      const float s = 1.f / (1.f + exp_f32(-tau * (rho_c - 1.f)));
      pg = -(4.f / tau) * s * a;
      dpg = -4.f * s * (1.f - s) * a * drho_c;
    } else if (LT == kREINFORCE) {
      pg = -a * x_lp;
      dpg = -a;
    } else if (LT == kGMPO) {
      const float dc = a > 0.f ? (l <= eh ? 1.f : 0.f) : (a < 0.f ? (l >= -el ? 1.f : 0.f) : 0.f);
      dpg = gmpo_G * dc;
      clip = (l < -el | l > eh) ? 1.f : 0.f;
    }
    // detached weights
    float w = PLAIN ? 1.f : c_keep[t] * w_row;
    if (TOKROLL) {
      const float r = exp_f32(clampf(c_old[t] - c_roll[t], -20.f, 20.f));
      const float w_t = r > r_max ? r_max : r;
      const float w_m = (r >= r_min & r <= r_max) ? r : 0.f;
      w *= w_trunc * w_t + (1.f - w_trunc) * w_m;
    }
    float L = LT == kGMPO ? 0.f : w * pg;
    float g = LT == kGMPO ? dpg : w * dpg;
    // KL term (x = ref - lp)
    float klv = 0.f;
    if (KL) {
      const float d = x_lp - c_ref[t];
      const float xk = -d;
      const float xc = clampf(xk, xlo, xhi);
      const float e = exp_f32(xc);
      const float k3 = e - xc - 1.f;
      const float k3c = clampf(k3, klo, khi);
      const bool k3_live = xk >= xlo & xk <= xhi & k3 >= klo & k3 <= khi;
      const float dk3 = k3_live ? -(e - 1.f) : 0.f;
      const float sgn = d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f);
      // blends with 0/1 weights (a ternary chain on kl_type would become a switch and stop SIMD)
      klv = w_k1 * d + w_abs * std::fabs(d) + w_k2 * (0.5f * d * d) + w_k3 * k3c;
      const float dkl_own = w_k1 + w_abs * sgn + w_k2 * d + w_k3 * dk3;
      const float dkl = w_st * d + (1.f - w_st) * dkl_own;
      const float kr = 1.f + w_rho * (rho_c - 1.f);
      L += kl_coef * kr * klv;
      g += kl_coef * kr * dkl;
    }
    const float h = PLAIN ? 0.f : c_ent[t];  // a row of zeros when no entropy is given
    L -= ent_coef * h;
    c_dlp[t] = v ? g : 0.f;
    if (DH) c_dH[t] = v ? -ent_coef : 0.f;
    s_loss += v ? L : 0.f;
    s_n += v ? 1.f : 0.f;
    s_clip += v ? clip : 0.f;
    s_low += v ? low : 0.f;
    s_negl += v ? -l : 0.f;
    s_kl += v ? klv : 0.f;
    s_H += v ? h : 0.f;
    s_sel += v ? sbt : 0.f;
  }
  part[0] = s_loss; part[1] = s_n; part[2] = s_clip; part[3] = s_low;
  part[4] = s_negl; part[5] = s_kl; part[6] = s_H; part[7] = s_sel;
  return hits;
}

// One row, no selection scan: row_stats, then the chunks in order (fixed-order sums).
template <int LT, int FL>
__attribute__((always_inline)) inline void row_body(const Cfg& c, const Row& R) {
  const RowCtx x = row_stats<LT, FL>(c, R);
  float t[kRowCols] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t t0 = 0; t0 < c.T; t0 += kChunk) {
    const int64_t n = c.T - t0 < kChunk ? c.T - t0 : kChunk;
    float part[kRowCols];
    chunk_body<LT, FL, kSelMask>(c, R, x, t0, n, R.dlp + t0, part, 0, nullptr);
    for (int j = 0; j < kRowCols; ++j) t[j] += part[j];
  }
  t[0] += x.gmpo_row;
  for (int j = 0; j < kRowCols; ++j) R.out[j] = t[j];
}

// The same body compiled for AVX-512 (32 vector registers: the token loop's live values fit
// without spilling), AVX2+FMA and the baseline, picked at run time. (target_clones left some
// instantiations scalar; explicit targets keep them vectorised.)
template <int LT, int FL>
__attribute__((target("arch=x86-64-v4"))) void row_kernel_avx512(const Cfg& c, const Row& R) { row_body<LT, FL>(c, R); }

template <int LT, int FL>
__attribute__((target("arch=x86-64-v3"))) void row_kernel_avx2(const Cfg& c, const Row& R) { row_body<LT, FL>(c, R); }

template <int LT, int FL>
void row_kernel_base(const Cfg& c, const Row& R) { row_body<LT, FL>(c, R); }

// 2: AVX-512 (F, VL, BW, DQ), 1: AVX2 + FMA, 0: baseline
inline int cpu_level() {
  static const int level = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
                               ? 2
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
  return level;
}

template <int LT, int FL>
void row_kernel(const Cfg& c, const Row& R) {
  switch (cpu_level()) {
    case 2: row_kernel_avx512<LT, FL>(c, R); break;
    case 1: row_kernel_avx2<LT, FL>(c, R); break;
    default: row_kernel_base<LT, FL>(c, R);
  }
}


// ---------------------------------------------------------------------------------------------
// Clip-Cov / KL-Cov in one call: covariance sums, then ONE pass over the rows that computes the
// loss and gradient with nothing picked while collecting the selection candidates, then a fix-up
// of the few chunks that hold picked tokens.
//
//   1. [sum_v A, sum_v lp, n] (cov_sums_rows, or given: all-reduced sums) -> CovParams.
//   2. rows (OpenMP, static ranges): per chunk of kChunk tokens, chunk_body in scan mode writes
//      d(row loss)/d(lp) and the chunk's sums parts[i, chunk, :], plus each token's 64-bit
//      selection key (cov_select_common.h). Each thread keeps only keys below its running bound
//      (the largest of its k smallest so far) in a small buffer, cut back to k when full.
//   3. merge: the k smallest keys over all threads (unique keys: independent of the thread count).
//   4. every chunk holding a pick is recomputed with its selection row (same code as the plain
//      path), which rewrites its gradient and replaces its sums; rows sum their chunks in order.
// Results are bitwise those of cov_select + policy_loss_fwd (same chunking, same sums order).
// ---------------------------------------------------------------------------------------------
struct Pick {
  uint64_t key;
  int64_t idx;
  bool operator<(const Pick& o) const { return key < o.key || (key == o.key && idx < o.idx); }
};

struct TopK {  // a thread's candidates that may be among the k smallest keys
  std::vector<Pick> v;
  Pick bound{kNoKey, INT64_MAX};
  int64_t k = 1;
  size_t cap = 2;
  void add(const Pick& p) {
    if (!(p < bound)) return;
    v.push_back(p);
    if (v.size() >= cap) {
      std::nth_element(v.begin(), v.begin() + (k - 1), v.end());
      v.resize(static_cast<size_t>(k));
      bound = *std::max_element(v.begin(), v.end());
    }
  }
};

// Every input row (absent optional inputs point at one row of neutral values).
struct Inputs {
  int64_t T;
  const float *lp, *old, *adv, *ref, *ent, *roll, *keep;
  const uint8_t *mask, *sel;
  float *row, *dlp, *dH;
  const float *zeros, *ones;
  const uint8_t* no_sel;
  Row at(int64_t i) const {
    const int64_t o = i * T;
    return Row{lp + o, old + o, adv + o, ref ? ref + o : zeros, ent ? ent + o : zeros, roll ? roll + o : old + o,
               keep ? keep + o : ones, mask + o, sel ? sel + o : no_sel, row + i * kRowCols,
               dlp ? dlp + o : nullptr, dH ? dH + o : nullptr};
  }
};

struct CovScanArgs {
  const Cfg* c;
  const Inputs* in;
  const CovParams* P;
  int64_t i0, i1;   // rows of this thread
  TopK* top;
  float* parts;     // [B, nchunks, 8]
  RowCtx* ctxs;     // [B]
  float* scratch;   // [kChunk] gradient sink when d(lp) is not wanted
};

template <int LT, int FL, int SM>
__attribute__((always_inline)) inline void cov_scan_body(const CovScanArgs& a) {
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
    float t[kRowCols] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t ci = 0; ci < nch; ++ci) {
      const int64_t t0 = ci * kChunk, n = T - t0 < kChunk ? T - t0 : kChunk;
      so.bound_hi = static_cast<uint32_t>(top.bound.key >> 32);
      float* part = a.parts + (i * nch + ci) * kRowCols;
      const int64_t flat = i * T + t0;
      const uint32_t nh = chunk_body<LT, FL, SM>(c, R, x, t0, n, R.dlp ? R.dlp + t0 : a.scratch, part,
                                                 static_cast<uint32_t>(flat), &so);
      for (int j = 0; j < kRowCols; ++j) t[j] += part[j];
      if (nh == 0) continue;
      for (int64_t k = 0; k < n; ++k) {
        if (!hit[k]) continue;
        const int64_t idx = flat + k;
        top.add(Pick{(static_cast<uint64_t>(ord[k]) << 32) | (static_cast<uint64_t>(idx) & 0xffffffffull), idx});
      }
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
__attribute__((always_inline)) inline void cov_fix_body(const CovFixArgs& a) {
  const Cfg& c = *a.c;
  const int64_t T = c.T, nch = (T + kChunk - 1) / kChunk;
  Row R = a.in->at(a.i);
  R.sel = a.selrow;
  const int64_t t0 = a.ci * kChunk, n = T - t0 < kChunk ? T - t0 : kChunk;
  chunk_body<LT, FL, kSelMask>(c, R, *a.x, t0, n, R.dlp ? R.dlp + t0 : a.scratch,
                               a.parts + (a.i * nch + a.ci) * kRowCols, 0, nullptr);
}

template <int LT, int FL, int SM>
__attribute__((target("arch=x86-64-v4"))) void cov_scan_avx512(const CovScanArgs& a) { cov_scan_body<LT, FL, SM>(a); }
template <int LT, int FL, int SM>
__attribute__((target("arch=x86-64-v3"))) void cov_scan_avx2(const CovScanArgs& a) { cov_scan_body<LT, FL, SM>(a); }
template <int LT, int FL, int SM>
void cov_scan_base(const CovScanArgs& a) { cov_scan_body<LT, FL, SM>(a); }

template <int LT, int FL>
__attribute__((target("arch=x86-64-v4"))) void cov_fix_avx512(const CovFixArgs& a) { cov_fix_body<LT, FL>(a); }
template <int LT, int FL>
__attribute__((target("arch=x86-64-v3"))) void cov_fix_avx2(const CovFixArgs& a) { cov_fix_body<LT, FL>(a); }
template <int LT, int FL>
void cov_fix_base(const CovFixArgs& a) { cov_fix_body<LT, FL>(a); }

using CovScanFn = void (*)(const CovScanArgs&);
using CovFixFn = void (*)(const CovFixArgs&);

template <int LT, int FL>
void cov_fns(CovScanFn& scan, CovFixFn& fix) {
  constexpr int SM = LT == kCLIPCOV ? kScanClip : kScanKL;
  switch (cpu_level()) {
    case 2: scan = cov_scan_avx512<LT, FL, SM>; fix = cov_fix_avx512<LT, FL>; break;
    case 1: scan = cov_scan_avx2<LT, FL, SM>; fix = cov_fix_avx2<LT, FL>; break;
    default: scan = cov_scan_base<LT, FL, SM>; fix = cov_fix_base<LT, FL>;
  }
}

template <int LT>
void cov_fns_flags(int flags, CovScanFn& scan, CovFixFn& fix) {
  switch (flags) {
    case 0: cov_fns<LT, 0>(scan, fix); break;
    case 1: cov_fns<LT, 1>(scan, fix); break;
    case 2: cov_fns<LT, 2>(scan, fix); break;
    case 3: cov_fns<LT, 3>(scan, fix); break;
    case 4: cov_fns<LT, 4>(scan, fix); break;
    case 5: cov_fns<LT, 5>(scan, fix); break;
    case 6: cov_fns<LT, 6>(scan, fix); break;
    case 7: cov_fns<LT, 7>(scan, fix); break;
    case 8: cov_fns<LT, 8>(scan, fix); break;
    case 9: cov_fns<LT, 9>(scan, fix); break;
    case 12: cov_fns<LT, 12>(scan, fix); break;
    default: cov_fns<LT, 13>(scan, fix); break;
  }
}

// ip = [loss_type (clip_cov | kl_cov), kl_type, kl_straight, kl_clamp, kl_rho, rollout];
// f = the 14 policy_loss_fwd parameters, then [cov_ratio, cov_lb, cov_ub].
// cov: fp32 [sum_v A, sum_v lp, n (for the means), n_local (for k)] or 0 (computed here);
// seed: int64 [1]. dlp may be 0 (forward only: the gradient is not written).
void policy_loss_cov_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask,
                         uintptr_t ref, uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t cov, uintptr_t seed,
                         uintptr_t row, uintptr_t dlp, const std::vector<int64_t>& ip, const std::vector<double>& f) {
  if (ip.size() != 6 || f.size() != 17)
    throw std::invalid_argument("policy_loss_cov_fwd_cpu: expected 6 int and 17 float parameters");
  const int loss_type = static_cast<int>(ip[0]), rollout = static_cast<int>(ip[5]);
  if (loss_type != kCLIPCOV && loss_type != kKLCOV)
    throw std::invalid_argument("policy_loss_cov_fwd_cpu: loss type must be clip_cov or kl_cov");
  Cfg c{B, T, static_cast<int>(ip[1]), ref != 0, ip[2] != 0, ip[3] != 0, ip[4] != 0, ent != 0, false, rollout,
        float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5]), float(f[6]), float(f[7]),
        float(f[8]), float(f[9]), float(f[10]), float(f[11]), float(f[12]), float(f[13])};
  if (B == 0) return;
  std::vector<float> zeros(static_cast<size_t>(T), 0.f), ones(static_cast<size_t>(T), 1.f);
  std::vector<uint8_t> no_sel(static_cast<size_t>(T), 0);
  const Inputs in{T, ptr<const float>(lp), ptr<const float>(old), ptr<const float>(adv), ptr<const float>(ref),
                  ptr<const float>(ent), ptr<const float>(roll), ptr<const float>(keep), ptr<const uint8_t>(mask),
                  nullptr, ptr<float>(row), ptr<float>(dlp), nullptr, zeros.data(), ones.data(), no_sel.data()};

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
  const CovParams P = cov_params(s, s[3], f[14], f[15], f[16], f[0], f[1], mode,
                                 static_cast<uint64_t>(*ptr<const int64_t>(seed)));
  const bool seq_w = rollout == kSeqTrunc || rollout == kSeqMask || std::isfinite(c.offpol_thr);
  const int flags = (ref ? kFlagKL : 0) | ((rollout == kTokTrunc || rollout == kTokMask) ? kFlagTokRoll : 0) |
                    ((!keep && !ent && !seq_w) ? kFlagPlain : 0);
  CovScanFn scan = nullptr;
  CovFixFn fix = nullptr;
  if (loss_type == kCLIPCOV) cov_fns_flags<kCLIPCOV>(flags, scan, fix);
  else cov_fns_flags<kKLCOV>(flags, scan, fix);

  // 2. loss and gradient with nothing picked + candidates, one pass
  const int64_t nch = (T + kChunk - 1) / kChunk;
  std::vector<float> parts(static_cast<size_t>(B * nch * kRowCols));
  std::vector<RowCtx> ctxs(static_cast<size_t>(B));
  const int nthreads = omp_get_max_threads();
  std::vector<TopK> tops(static_cast<size_t>(nthreads));
  for (auto& tk : tops) {
    tk.k = P.k;
    tk.cap = static_cast<size_t>(std::max<int64_t>(2 * P.k, P.k + 256));
    tk.v.reserve(tk.cap);
  }
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    alignas(64) float scratch[kChunk];
    const CovScanArgs a{&c, &in, &P, B * tid / nt, B * (tid + 1) / nt, &tops[tid], parts.data(), ctxs.data(),
                        scratch};
    scan(a);
  }

  // 3. the k smallest keys over all threads, in index order
  std::vector<Pick> picks;
  for (auto& tk : tops) picks.insert(picks.end(), tk.v.begin(), tk.v.end());
  const int64_t kk = std::min<int64_t>(P.k, static_cast<int64_t>(picks.size()));
  if (kk == 0) return;
  std::nth_element(picks.begin(), picks.begin() + (kk - 1), picks.end());
  picks.resize(static_cast<size_t>(kk));
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
      fix(a);
      for (int64_t j = gstart[g]; j < gstart[g + 1]; ++j) selrow[picks[j].idx - i * T] = 0;
    }
  }
  for (const int64_t i : rows_hit) {
    float t[kRowCols] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t ci = 0; ci < nch; ++ci)
      for (int j = 0; j < kRowCols; ++j) t[j] += parts[(i * nch + ci) * kRowCols + j];
    t[0] += ctxs[i].gmpo_row;
    float* out = in.row + i * kRowCols;
    for (int j = 0; j < kRowCols; ++j) out[j] = t[j];
  }
}


void policy_loss_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t ref,
                     uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t sel, uintptr_t row, uintptr_t dlp,
                     uintptr_t dH, int loss_type, int kl_type, bool kl_straight, bool kl_clamp, bool kl_rho,
                     int rollout, const std::vector<double>& f) {
  if (f.size() != 14) throw std::invalid_argument("policy_loss_fwd_cpu: expected 14 float parameters");
  Cfg c{B, T, kl_type, ref != 0, kl_straight, kl_clamp, kl_rho, ent != 0, dH != 0, rollout,
        float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5]), float(f[6]), float(f[7]),
        float(f[8]), float(f[9]), float(f[10]), float(f[11]), float(f[12]), float(f[13])};
  // Absent optional inputs read from one shared row of neutral values (keeps the loops branch-free).
  std::vector<float> zeros(static_cast<size_t>(T), 0.f), ones(static_cast<size_t>(T), 1.f);
  std::vector<uint8_t> no_sel(static_cast<size_t>(T), 0);
  if (B == 0) return;
  const float* f_lp = ptr<const float>(lp);
  const float* f_old = ptr<const float>(old);
  const float* f_adv = ptr<const float>(adv);
  const uint8_t* u_mask = ptr<const uint8_t>(mask);
  const int flags = (ref ? kFlagKL : 0) | (dH ? kFlagDH : 0) |
                    ((rollout == kTokTrunc || rollout == kTokMask) ? kFlagTokRoll : 0);
  auto launch = [&](auto tag) {
    constexpr int LT = decltype(tag)::value;
    void (*fn)(const Cfg&, const Row&) = nullptr;
    switch (flags) {
      case 0: fn = row_kernel<LT, 0>; break;
      case 1: fn = row_kernel<LT, 1>; break;
      case 2: fn = row_kernel<LT, 2>; break;
      case 3: fn = row_kernel<LT, 3>; break;
      case 4: fn = row_kernel<LT, 4>; break;
      case 5: fn = row_kernel<LT, 5>; break;
      case 6: fn = row_kernel<LT, 6>; break;
      default: fn = row_kernel<LT, 7>; break;
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < B; ++i) {
      const int64_t o = i * T;
      Row r{f_lp + o, f_old + o, f_adv + o,
            ref ? ptr<const float>(ref) + o : zeros.data(),
            ent ? ptr<const float>(ent) + o : zeros.data(),
            roll ? ptr<const float>(roll) + o : f_old + o,
            keep ? ptr<const float>(keep) + o : ones.data(),
            u_mask + o, sel ? ptr<const uint8_t>(sel) + o : no_sel.data(),
            ptr<float>(row) + i * kRowCols, ptr<float>(dlp) + o, dH ? ptr<float>(dH) + o : nullptr};
      fn(c, r);
    }
  };
  switch (loss_type) {
    case kPPO: launch(std::integral_constant<int, kPPO>{}); break;
    case kGSPO: launch(std::integral_constant<int, kGSPO>{}); break;
    case kCISPO: launch(std::integral_constant<int, kCISPO>{}); break;
    case kSAPO: launch(std::integral_constant<int, kSAPO>{}); break;
    case kREINFORCE: launch(std::integral_constant<int, kREINFORCE>{}); break;
    case kGMPO: launch(std::integral_constant<int, kGMPO>{}); break;
    case kCLIPCOV: launch(std::integral_constant<int, kCLIPCOV>{}); break;
    case kKLCOV: launch(std::integral_constant<int, kKLCOV>{}); break;
    default: throw std::invalid_argument("policy_loss_fwd_cpu: unknown loss type code");
  }
}

// Backward: gl[i, t] = dlp[i, t] g_i and ge[i, t] = -ent_coef m[i, t] g_i (g_i = grow[i * gstride]),
// one pass over the rows; either output may be absent (0).
template <bool GL, bool GE>
__attribute__((always_inline)) inline void grads_row(int64_t T, const float* __restrict dlp,
                                                     const uint8_t* __restrict mask, float g, float ge_v,
                                                     float* __restrict gl, float* __restrict ge) {
  if (GL) {
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) gl[t] = dlp[t] * g;
  }
  if (GE) {
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) ge[t] = mask[t] != 0 ? ge_v : 0.f;
  }
}

template <bool GL, bool GE>
__attribute__((target("arch=x86-64-v4"))) void grads_rows_avx512(int64_t B, int64_t T, const float* dlp,
    const float* grow, int64_t gstride, const uint8_t* mask, float ent_coef, float* gl, float* ge) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const float g = grow[i * gstride];
    grads_row<GL, GE>(T, dlp + i * T, mask + i * T, g, -ent_coef * g, gl + (GL ? i * T : 0), ge + (GE ? i * T : 0));
  }
}

template <bool GL, bool GE>
void grads_rows_base(int64_t B, int64_t T, const float* dlp, const float* grow, int64_t gstride, const uint8_t* mask,
                     float ent_coef, float* gl, float* ge) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const float g = grow[i * gstride];
    grads_row<GL, GE>(T, dlp + i * T, mask + i * T, g, -ent_coef * g, gl + (GL ? i * T : 0), ge + (GE ? i * T : 0));
  }
}

void policy_loss_bwd(int64_t B, int64_t T, uintptr_t dlp, uintptr_t grow, int64_t gstride, uintptr_t mask,
                     double ent_coef, uintptr_t gl, uintptr_t ge) {
  if (B == 0 || (!gl && !ge)) return;
  auto run = [&](auto fa, auto fb, auto fc) {
    auto* f = cpu_level() == 2 ? fa : (cpu_level() == 1 ? fb : fc);
    f(B, T, ptr<const float>(dlp), ptr<const float>(grow), gstride, ptr<const uint8_t>(mask), float(ent_coef),
      ptr<float>(gl), ptr<float>(ge));
  };
  if (gl && ge) run(grads_rows_avx512<true, true>, grads_rows_base<true, true>, grads_rows_base<true, true>);
  else if (gl) run(grads_rows_avx512<true, false>, grads_rows_base<true, false>, grads_rows_base<true, false>);
  else run(grads_rows_avx512<false, true>, grads_rows_base<false, true>, grads_rows_base<false, true>);
}

}  // namespace

FASTALIGN_BINDINGS(policy_loss) {
  namespace py = pybind11;
  m.def("policy_loss_fwd_cpu", &policy_loss_fwd, py::call_guard<py::gil_scoped_release>(),
        "Fused per-token policy loss over [B, T] fp32 rows (uint8 mask/selection): per-row sums "
        "[B, 8], d(row loss)/d(lp) and d/d(H). Optional inputs/outputs are 0 pointers.");
  m.def("policy_loss_cov_fwd_cpu", &policy_loss_cov_fwd, py::call_guard<py::gil_scoped_release>(),
        "Clip-Cov / KL-Cov policy loss in one call: covariance sums (or given), loss and gradient with "
        "the selection candidates collected in the same pass, fix-up of the chunks holding picks. "
        "Per-row sums [B, 8] and d(row loss)/d(lp) (0 pointer: not written).");
  m.def("policy_loss_bwd_cpu", &policy_loss_bwd, py::call_guard<py::gil_scoped_release>(),
        "Backward of the row losses: d lp = dlp * g_row, d H = -ent_coef * mask * g_row (either output "
        "may be 0).");
}

}  // namespace fastalign
