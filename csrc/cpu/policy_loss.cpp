// Policy-gradient losses of docs/math.md#policy-losses with the added terms, fused, on the CPU.
//
// One row (sequence) i at a time, OpenMP over rows. Per token t (fp32, v = mask):
//   l = lp - old,  rho = exp(clamp(l, -20, 20))  (importance_sampling_level = sequence:
//                  rho = s_i = exp(clamp(mean_v l, -20, 20)) for every token of the row)
//   pg_t                  the loss-type row of the table below, with
//   dpg_t = d_own_t + d_rho_t drho_t/dlp_t   its derivative (d_rho: derivative in rho)
//   w_t = w_tok_t * w_row  detached weights: rollout correction, entropy-quantile keep mask times
//                          importance weights, sequence off-policy mask
//   K_t = KL_t * (rho if kl_rho else 1)
//   L_t  = w_t pg_t + kl_coef K_t - ent_coef H_t
//   dlp_t = v (w_t dpg_t + kl_coef dK_t/dlp_t)
// Token level: drho_t/dlp_t = rho_t. Sequence level: ds_i/dlp_t = s_i v_t / n_i, so every valid
// token of the row also gets  s_i / n_i * sum_u v_u (w_u d_rho_u + kl_coef KL_u [kl_rho = grad]).
// Sequence-level quantities (gspo's s_i, gmpo's means, vespo's weight, sequence rollout weights,
// the off-policy mask) come from a first pass over the row. Outputs per row (fixed-order sums,
// so bitwise deterministic):
//   row[i, :] = [sum v L, n, #clipped, #dual-clipped, sum v(-l), sum v K, sum v H, #selected,
//                #clip_low, #clip_high, vespo phi of the row]
// and the per-token d(row loss)/d(lp); the aggregation (docs/math.md#aggregation) is a weighted sum of row losses
// done by the caller, and backward only scales dlp by the upstream gradient of each row.
//
// Loss types (LT), r1 = min(rho, delta):
//   ppo      L1 = -A r1, L2 = -A clip(rho, 1-el, 1+eh), max(L1, L2) (L2 only if strictly
//            larger), dual clip min(., -cA) for A < 0 (only if strictly larger)
//   gspo     rho = exp(min(mean_v l, 10)) per row (gradient d rho/d lp_t = rho), ppo clip
//   cispo    -sg(clip(rho, lo, hi)) A lp
//   sapo     -(4/tau) sigma(tau (rho - 1)) A, tau = tau_pos if A > 0 else tau_neg
//   reinforce -A lp
//   gmpo     c_t = A > 0 ? min(l, eh) : A < 0 ? max(l, -el) : 0;
//            row loss -exp(mean_v c) mean_v A times sum_t v w_tok_t times the geometric mean
//            of the importance weights
//   clip_cov ppo clip on exp(l) (no clamps, no dual clip), selected tokens' pg set to 0
//   kl_cov   -A exp(l) + cov_kl_coef |l| on selected tokens
//   vespo    -sg(phi_t) A lp, log phi_t = lam + k log W_i - lam W_i, (k, lam) by sign(A_t) >= 0,
//            log W_i = clamp(sum_v clamp(l, -20, 20) + sum_v clamp(log iw, log 1e-8, 20), log 1e-8, 20)
//   dppo_tv  -sg(min(rho, delta) k_t) A lp, k_t = 1 where the probability moved within the bound:
//            A > 0: p - p_old <= eh, else p - p_old >= -el (p = exp(lp), p_old = exp(old))
//   dppo_kl  the same with the binary KL D = p_old (old - lp) + (1 - p_old) log((1 - p_old + 1e-8) /
//            (1 - p + 1e-8)): A > 0: D <= eh or p <= p_old, else D <= el or p >= p_old
//            (dppo: clip = 1 - k_t, dual = k_t [rho > delta])
//   dro      -A lp + beta/2 l^2
// Clip metrics: clip_low = A < 0 and r1 < lo, clip_high = A > 0 and r1 > hi (ppo rows; cispo
// with its bounds; gmpo: l outside [-el, eh] by the sign of A).
// A NaN rollout log-prob is a log-ratio of 0 (an unscorable token); any other NaN propagates.
// GCC sinks the loads of optional inputs into the masked branch, which leaves conditional
// (possibly trapping) loads that if-conversion rejects and the token loop stays scalar.
// Without load sinking the whole per-token body becomes straight-line SIMD code.
#pragma GCC optimize("no-tree-sink")
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <omp.h>
#include <pybind11/stl.h>

#include "cpu/cov_select_common.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

enum LossType : int { kPPO = 0, kGSPO, kCISPO, kSAPO, kREINFORCE, kGMPO, kCLIPCOV, kKLCOV, kVESPO, kDPPOTV, kDPPOKL, kDRO };
enum KLType : int { kK1 = 0, kAbs, kK2, kK3 };
enum Rollout : int { kRollNone = 0, kTokTrunc, kTokMask, kSeqTrunc, kSeqMask };
enum KLRho : int { kKLRhoOff = 0, kKLRhoDetached, kKLRhoGrad };

constexpr int kRowCols = 11;
constexpr float kHuge = std::numeric_limits<float>::infinity();
constexpr int kPartCols = kRowCols + 1;  // a chunk's sums plus its sequence-level gradient sum

// The launch parameters, in the order of fastalign.policy_config.KernelParams (the Python side
// checks the names against policy_loss_param_names() once). Codes are carried as exact floats.
#define FASTALIGN_POLICY_PARAMS(X)                                                                   \
  X(int, loss_type) X(int, is_level) X(int, kl_type) X(int, kl_straight) X(int, kl_clamp)           \
  X(int, kl_rho) X(int, rollout) X(float, eps_low) X(float, eps_high) X(float, dual_clip)            \
  X(float, delta) X(float, cispo_lo) X(float, cispo_hi) X(float, tau_pos) X(float, tau_neg)          \
  X(float, vespo_k_pos) X(float, vespo_lambda_pos) X(float, vespo_k_neg) X(float, vespo_lambda_neg)  \
  X(float, kl_coef) X(float, entropy_coef) X(float, rollout_min) X(float, rollout_max)               \
  X(float, offpolicy_threshold) X(float, cov_kl_coef) X(float, cov_ratio) X(float, cov_lb)           \
  X(float, cov_ub) X(float, dro_beta)

struct PolicyParams {
#define FA_FIELD(type, name) type name;
  FASTALIGN_POLICY_PARAMS(FA_FIELD)
#undef FA_FIELD
};

#define FA_COUNT(type, name) +1
constexpr size_t kNumPolicyParams = 0 FASTALIGN_POLICY_PARAMS(FA_COUNT);
#undef FA_COUNT

PolicyParams params_from(const std::vector<double>& f, const char* who) {
  if (f.size() != kNumPolicyParams)
    throw std::invalid_argument(std::string(who) + ": expected " + std::to_string(kNumPolicyParams) +
                                " parameters, got " + std::to_string(f.size()));
  PolicyParams p{};
  size_t j = 0;
#define FA_SET(type, name) p.name = static_cast<type>(f[j++]);
  FASTALIGN_POLICY_PARAMS(FA_SET)
#undef FA_SET
  return p;
}

std::vector<std::string> policy_param_names() {
  std::vector<std::string> names;
#define FA_NAME(type, name) names.push_back(#name);
  FASTALIGN_POLICY_PARAMS(FA_NAME)
#undef FA_NAME
  return names;
}

// Parameters plus what the launch knows about its inputs.
struct Cfg : PolicyParams {
  int64_t B, T;
  bool iw_on;  // importance weights given (gmpo, vespo: they enter the sequence weight)
};

static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }


// One row's inputs (absent optional inputs point at a row of neutral values).
struct Row {
  const float *lp, *old, *adv, *ref, *ent, *roll, *keep, *iw;
  const uint8_t *mask, *sel;
  float *out, *dlp;
};

// Flags (compile time, so the token loop has no branches and vectorises).
// kFlagPlain (Clip-Cov / KL-Cov path only): no keep mask, no entropy, row weight 1, so the token
// loop reads neither neutral row. kFlagSeq: importance_sampling_level = sequence (ppo, cispo, sapo).
// kFlagKLRho: the KL term is multiplied by the ratio (kl_rho detached or with its gradient).
enum Flag : int { kFlagKL = 1, kFlagTokRoll = 2, kFlagPlain = 4, kFlagSeq = 8, kFlagKLRho = 16 };

// Row-level quantities from pass 1 that the token loop needs.
struct RowCtx {
  float w_row, rho_row, gmpo_G, gmpo_row, vespo_logw, vespo_w, vespo_phi, inv_n;
};

// rollout log-ratio old - rollout; an unscorable rollout token (NaN) counts as 0
static inline float rollout_log_ratio(float old, float roll) { return roll == roll ? old - roll : 0.f; }

static inline float rollout_weight(float r, bool trunc, float r_min, float r_max) {
  return trunc ? clampf(r, r_min, r_max) : (((r >= r_min) & (r <= r_max)) ? r : 0.f);
}

// vespo's detached weight phi = exp(lam + k log W - lam W), 0 where it is not finite
static inline float vespo_phi(const Cfg& c, bool pos, float logw, float w) {
  const float k = pos ? c.vespo_k_pos : c.vespo_k_neg;
  float lam = pos ? c.vespo_lambda_pos : c.vespo_lambda_neg;
  lam = lam < 1e-4f ? 1e-4f : lam;
  const float lphi = lam + k * logw - lam * w;
  return ((lphi == lphi) & (lphi < 88.f)) ? exp_f32(lphi) : 0.f;
}

// ---- pass 1: per-row sums (only what the configuration needs) ----
template <int LT, int FL>
__attribute__((always_inline)) inline RowCtx row_stats(const Cfg& c, const Row& R) {
  const int64_t T = c.T;
  const float* __restrict lp = R.lp;
  const float* __restrict old = R.old;
  const float* __restrict adv = R.adv;
  const float* __restrict roll = R.roll;
  const float* __restrict keep = R.keep;
  const float* __restrict iw = R.iw;
  const uint8_t* __restrict mask = R.mask;
  const bool tok_roll = c.rollout == kTokTrunc || c.rollout == kTokMask;
  const bool roll_trunc = c.rollout == kTokTrunc || c.rollout == kSeqTrunc;
  const bool seq_roll = c.rollout == kSeqTrunc || c.rollout == kSeqMask;
  const bool offpol = std::isfinite(c.offpolicy_threshold);
  const float el = c.eps_low, eh = c.eps_high, r_min = c.rollout_min, r_max = c.rollout_max;
  const float log_lo = std::log(1e-8f);
  float n1 = 0.f, sl = 0.f, slr = 0.f, sc = 0.f, sa = 0.f, sw = 0.f, skd = 0.f, slc = 0.f, sli = 0.f;
  const bool need1 = LT == kGSPO || LT == kGMPO || LT == kVESPO || seq_roll || offpol || c.is_level != 0;
  if (need1) {
#pragma omp simd reduction(+ : n1, sl, slr, sc, sa, sw, skd, slc, sli)
    for (int64_t t = 0; t < T; ++t) {
      const bool v = mask[t] != 0;
      const float l = lp[t] - old[t];
      const float a = adv[t];
      const float lr = rollout_log_ratio(old[t], roll[t]);
      const float kd = roll[t] == roll[t] ? roll[t] - lp[t] : 0.f;  // off-policy KL evidence
      const float r = exp_f32(clampf(lr, -20.f, 20.f));
      const float wt = (tok_roll ? rollout_weight(r, roll_trunc, r_min, r_max) : 1.f) * keep[t];
      const float ct = a > 0.f ? (l > eh ? eh : l) : (a < 0.f ? (l < -el ? -el : l) : 0.f);
      float li = 0.f;  // log importance weight: gmpo's geometric mean, vespo's sequence weight
      if (LT == kGMPO) li = std::log(iw[t] + 1e-10f);
      if (LT == kVESPO) li = clampf(std::log(iw[t]), log_lo, 20.f);
      n1 += v ? 1.f : 0.f;
      sl += v ? l : 0.f;
      slr += v ? lr : 0.f;
      sc += v ? ct : 0.f;
      sa += v ? a : 0.f;
      sw += v ? wt : 0.f;
      skd += v ? kd : 0.f;
      slc += v ? clampf(l, -20.f, 20.f) : 0.f;
      sli += (v & c.iw_on) ? li : 0.f;
    }
  }
  const float inv_n = 1.f / (n1 > 1.f ? n1 : 1.f);
  RowCtx x{1.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, inv_n};
  if (seq_roll) x.w_row = rollout_weight(std::exp(clampf(slr, -20.f, 20.f)), roll_trunc, r_min, r_max);
  if (offpol && sa * inv_n < 0.f && skd * inv_n > c.offpolicy_threshold) x.w_row = 0.f;
  if (LT == kGSPO) x.rho_row = std::exp(clampf(sl * inv_n, -kHuge, 10.f));  // keeps NaN
  if (c.is_level != 0) x.rho_row = std::exp(clampf(sl * inv_n, -20.f, 20.f));
  if (LT == kGMPO && n1 > 0.f) {
    const float seq = -std::exp(sc * inv_n) * (sa * inv_n);
    x.gmpo_row = x.w_row * sw * seq * (c.iw_on ? std::exp(sli * inv_n) : 1.f);
    x.gmpo_G = x.gmpo_row * inv_n;  // times dc_t
  }
  if (LT == kVESPO) {
    x.vespo_logw = clampf(slc + sli, log_lo, 20.f);
    x.vespo_w = std::exp(x.vespo_logw);
    x.vespo_phi = vespo_phi(c, sa * inv_n >= 0.f, x.vespo_logw, x.vespo_w);
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
// sums part[0..kRowCols) (without the row-level gmpo term and vespo phi) plus, in part[kRowCols],
// the sequence-level gradient sum sum_v (w d_rho + kl_coef K [kl_rho = grad]).
// d(row loss)/d(lp) goes to c_dlp[0..n). Returns the number of hits in scan modes.
template <int LT, int FL, int SM>
__attribute__((always_inline)) inline uint32_t chunk_body(const Cfg& c, const Row& R, const RowCtx& x, int64_t t0,
                                                          int64_t n, float* __restrict c_dlp, float* part,
                                                          uint32_t flat0, const ScanOut* scan) {
  constexpr bool KL = (FL & kFlagKL) != 0, TOKROLL = (FL & kFlagTokRoll) != 0;
  constexpr bool PLAIN = (FL & kFlagPlain) != 0, SEQ = (FL & kFlagSeq) != 0, KLRHO = (FL & kFlagKLRho) != 0;
  constexpr bool SCAN = SM != kSelMask;
  constexpr bool PPO_ROW = LT == kPPO || LT == kGSPO || LT == kCLIPCOV;
  // configuration in locals: the stores below cannot alias it
  const float el = c.eps_low, eh = c.eps_high, cis_lo = c.cispo_lo, cis_hi = c.cispo_hi;
  const float tau_pos = c.tau_pos, tau_neg = c.tau_neg, kl_coef = c.kl_coef, ent_coef = c.entropy_coef;
  const float r_min = c.rollout_min, r_max = c.rollout_max, cov_kl = c.cov_kl_coef;
  const int rollout = c.rollout;
  const bool kl_clamp = c.kl_clamp != 0;
  const float w_k1 = c.kl_type == kK1, w_abs = c.kl_type == kAbs, w_k2 = c.kl_type == kK2, w_k3 = c.kl_type == kK3;
  const float w_st = c.kl_straight ? 1.f : 0.f;
  const float w_row = PLAIN ? 1.f : x.w_row, rho_row = x.rho_row, gmpo_G = x.gmpo_G;
  const float vespo_logw = x.vespo_logw, vespo_w = x.vespo_w;
  // 1 where the token's own ratio carries the gradient (0 at sequence level: see row_finish)
  constexpr float w_tok = SEQ ? 0.f : 1.f;
  const float w_kl_grad = c.kl_rho == kKLRhoGrad ? 1.f : 0.f;
  const float lo = 1.f - el, hi = 1.f + eh;
  // Options off become bounds that never bind (no runtime branches in the loop, so it vectorises).
  constexpr float kBig = std::numeric_limits<float>::max();
  const float delta_b = ((LT == kPPO || LT == kGSPO || LT == kDPPOTV || LT == kDPPOKL) && c.delta > 0.f) ? c.delta
                                                                                                      : kBig;
  const float dro_beta = c.dro_beta;
  const float dual_b = (LT == kPPO && c.dual_clip > 0.f) ? c.dual_clip : kBig;
  const float xlo = kl_clamp ? -20.f : -kBig, xhi = kl_clamp ? 20.f : kBig;
  const float klo = kl_clamp ? -10.f : -kBig, khi = kl_clamp ? 10.f : kBig;
  const bool trunc = rollout == kTokTrunc;
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
  float s_loss = 0.f, s_n = 0.f, s_clip = 0.f, s_low = 0.f, s_negl = 0.f, s_kl = 0.f, s_H = 0.f, s_sel = 0.f;
  float s_clo = 0.f, s_chi = 0.f, s_grow = 0.f;
  uint32_t hits = 0;
#pragma omp simd reduction(+ : s_loss, s_n, s_clip, s_low, s_negl, s_kl, s_H, s_sel, s_clo, s_chi, s_grow, hits)
  for (int64_t t = 0; t < n; ++t) {
    const bool v = vb[t] != 0.f;
    const float x_lp = c_lp[t], a = c_adv[t];
    const float l = x_lp - c_old[t];
    const float rho_c = exp_f32(clampf(l, -20.f, 20.f));
    const float drho_c = (l >= -20.f & l <= 20.f) ? rho_c : 0.f;
    // the importance ratio of the row and its own d/d(lp) (0 at sequence level: see d_row below)
    const float rho_is = SEQ ? rho_row : rho_c;
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
    // pg: the loss-type row; d_own: d pg / d lp through lp itself; d_rho: d pg / d rho
    float pg = 0.f, d_own = 0.f, d_rho = 0.f, drho = 0.f, clip = 0.f, low = 0.f, clo = 0.f, chi = 0.f;
    if (PPO_ROW) {
      float rho = rho_is;
      drho = w_tok * drho_c;
      if (LT == kGSPO) { rho = rho_row; drho = rho_row; }
      if (LT == kCLIPCOV) { rho = exp_f32(l); drho = rho; }
      const float r1 = rho > delta_b ? delta_b : rho;
      const float dr1 = rho > delta_b ? 0.f : 1.f;
      const float L1 = -a * r1;
      const float L2 = -a * clampf(rho, lo, hi);
      const float dL2 = (rho >= lo & rho <= hi) ? -a : 0.f;
      const bool is_clip = L2 > L1;
      pg = is_clip ? L2 : L1;
      d_rho = is_clip ? dL2 : -a * dr1;
      clip = is_clip ? 1.f : 0.f;
      clo = ((a < 0.f) & (r1 < lo)) ? 1.f : 0.f;
      chi = a > 0.f ? clip : 0.f;  // for A > 0, L2 > L1 exactly when r1 > hi
      if (LT == kPPO) {
        const float L3 = -dual_b * a;
        const bool is_low = a < 0.f & pg > L3;
        pg = is_low ? L3 : pg;
        d_rho = is_low ? 0.f : d_rho;
        low = is_low ? 1.f : 0.f;
      }
      if (LT == kCLIPCOV) {
        pg = picked ? 0.f : pg;
        d_rho = picked ? 0.f : d_rho;
      }
    } else if (LT == kKLCOV) {
      const float rho = exp_f32(l);
      pg = -a * rho + (picked ? cov_kl * std::fabs(l) : 0.f);
      d_own = -a * rho + (picked ? cov_kl * (l > 0.f ? 1.f : (l < 0.f ? -1.f : 0.f)) : 0.f);
    } else if (LT == kCISPO) {
      const float w = clampf(rho_is, cis_lo, cis_hi);
      pg = -w * a * x_lp;
      d_own = -w * a;
      clip = (rho_is < cis_lo | rho_is > cis_hi) ? 1.f : 0.f;
      clo = ((a < 0.f) & (rho_is < cis_lo)) ? 1.f : 0.f;
      chi = ((a > 0.f) & (rho_is > cis_hi)) ? 1.f : 0.f;
    } else if (LT == kSAPO) {
      const float tau = a > 0.f ? tau_pos : tau_neg;
      const float s = 1.f / (1.f + exp_f32(-tau * (rho_is - 1.f)));
      pg = -(4.f / tau) * s * a;
      d_rho = -4.f * s * (1.f - s) * a;
      drho = w_tok * drho_c;
    } else if (LT == kREINFORCE) {
      pg = -a * x_lp;
      d_own = -a;
    } else if (LT == kVESPO) {
      const float phi = vespo_phi(c, a >= 0.f, vespo_logw, vespo_w);
      pg = -phi * a * x_lp;
      d_own = -phi * a;
    } else if (LT == kDPPOTV || LT == kDPPOKL) {
      const float old_t = c_old[t];
      const float p = exp_f32(x_lp), p_old = exp_f32(old_t);
      bool ok_pos, ok_neg;
      if (LT == kDPPOTV) {
        ok_pos = p - p_old <= eh;
        ok_neg = p - p_old >= -el;
      } else {
        const float bkl = p_old * (old_t - x_lp) + (1.f - p_old) * std::log((1.f - p_old + 1e-8f) / (1.f - p + 1e-8f));
        ok_pos = (bkl <= eh) | (p <= p_old);
        ok_neg = (bkl <= el) | (p >= p_old);
      }
      const float k = (a > 0.f ? ok_pos : ok_neg) ? 1.f : 0.f;
      const bool trunc_hit = rho_c > delta_b;
      const float wt = (trunc_hit ? delta_b : rho_c) * k;
      pg = -wt * a * x_lp;
      d_own = -wt * a;
      clip = 1.f - k;
      low = trunc_hit ? k : 0.f;
    } else if (LT == kDRO) {
      pg = -a * x_lp + 0.5f * dro_beta * l * l;
      d_own = -a + dro_beta * l;
    } else if (LT == kGMPO) {
      const float dc = a > 0.f ? (l <= eh ? 1.f : 0.f) : (a < 0.f ? (l >= -el ? 1.f : 0.f) : 0.f);
      d_own = gmpo_G * dc;
      const bool out = (l < -el) | (l > eh);
      clip = out ? 1.f : 0.f;
      clo = (out & (a < 0.f)) ? 1.f : 0.f;
      chi = (out & (a > 0.f)) ? 1.f : 0.f;
    }
    // detached weights
    float w = PLAIN ? 1.f : c_keep[t] * w_row;
    if (TOKROLL) {
      const float r = exp_f32(clampf(rollout_log_ratio(c_old[t], c_roll[t]), -20.f, 20.f));
      w *= rollout_weight(r, trunc, r_min, r_max);
    }
    float L = LT == kGMPO ? 0.f : w * pg;
    float g = LT == kGMPO ? d_own : w * (d_own + d_rho * drho);
    float grow = w * d_rho;
    // KL term (x = ref - lp), times the ratio under kl_rho
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
      const float kv = w_k1 * d + w_abs * std::fabs(d) + w_k2 * (0.5f * d * d) + w_k3 * k3c;
      const float dkl_own = w_k1 + w_abs * sgn + w_k2 * d + w_k3 * dk3;
      const float dkl = w_st * d + (1.f - w_st) * dkl_own;
      if (KLRHO) {  // K = KL * rho: d/dlp = rho dKL + [grad] KL drho (at sequence level through d_row)
        klv = rho_is * kv;
        g += kl_coef * (rho_is * dkl + w_kl_grad * w_tok * drho_c * kv);
        grow += kl_coef * w_kl_grad * kv;
      } else {
        klv = kv;
        g += kl_coef * dkl;
      }
      L += kl_coef * klv;
    }
    const float h = PLAIN ? 0.f : c_ent[t];  // a row of zeros when no entropy is given
    L -= ent_coef * h;
    c_dlp[t] = v ? g : 0.f;
    s_loss += v ? L : 0.f;
    s_n += v ? 1.f : 0.f;
    s_clip += v ? clip : 0.f;
    s_low += v ? low : 0.f;
    s_negl += v ? -l : 0.f;
    s_kl += v ? klv : 0.f;
    s_H += v ? h : 0.f;
    s_sel += v ? sbt : 0.f;
    s_clo += v ? clo : 0.f;
    s_chi += v ? chi : 0.f;
    if (SEQ) s_grow += v ? grow : 0.f;
  }
  part[0] = s_loss; part[1] = s_n; part[2] = s_clip; part[3] = s_low;
  part[4] = s_negl; part[5] = s_kl; part[6] = s_H; part[7] = s_sel;
  part[8] = s_clo; part[9] = s_chi; part[10] = 0.f; part[kRowCols] = s_grow;
  return hits;
}

// Row-level terms after the chunks: gmpo's row loss, vespo's phi, and at sequence level the
// gradient through s_i spread over the valid tokens.
__attribute__((always_inline)) inline void row_finish(const Cfg& c, const Row& R, const RowCtx& x, float* t,
                                                      float grow) {
  t[0] += x.gmpo_row;
  t[10] = x.vespo_phi;
  if (c.is_level != 0 && R.dlp != nullptr) {
    const float add = grow * x.rho_row * x.inv_n;
    const uint8_t* __restrict mask = R.mask;
    float* __restrict dlp = R.dlp;
#pragma omp simd
    for (int64_t k = 0; k < c.T; ++k) dlp[k] += mask[k] != 0 ? add : 0.f;
  }
}

// One row, no selection scan: row_stats, then the chunks in order (fixed-order sums).
template <int LT, int FL>
__attribute__((always_inline)) inline void row_body(const Cfg& c, const Row& R) {
  const RowCtx x = row_stats<LT, FL>(c, R);
  float t[kRowCols] = {};
  float grow = 0.f;
  for (int64_t t0 = 0; t0 < c.T; t0 += kChunk) {
    const int64_t n = c.T - t0 < kChunk ? c.T - t0 : kChunk;
    float part[kPartCols];
    chunk_body<LT, FL, kSelMask>(c, R, x, t0, n, R.dlp + t0, part, 0, nullptr);
    for (int j = 0; j < kRowCols; ++j) t[j] += part[j];
    grow += part[kRowCols];
  }
  row_finish(c, R, x, t, grow);
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
  const float *lp, *old, *adv, *ref, *ent, *roll, *keep, *iw;
  const uint8_t *mask, *sel;
  float *row, *dlp;
  const float *zeros, *ones;
  const uint8_t* no_sel;
  Row at(int64_t i) const {
    const int64_t o = i * T;
    return Row{lp + o, old + o, adv + o, ref ? ref + o : zeros, ent ? ent + o : zeros, roll ? roll + o : old + o,
               keep ? keep + o : ones, iw ? iw + o : ones, mask + o, sel ? sel + o : no_sel, row + i * kRowCols,
               dlp ? dlp + o : nullptr};
  }
};

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
    float t[kRowCols] = {};
    for (int64_t ci = 0; ci < nch; ++ci) {
      const int64_t t0 = ci * kChunk, n = T - t0 < kChunk ? T - t0 : kChunk;
      so.bound_hi = static_cast<uint32_t>(top.bound.key >> 32);
      float* part = a.parts + (i * nch + ci) * kPartCols;
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
                               a.parts + (a.i * nch + a.ci) * kPartCols, 0, nullptr);
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
    case 17: cov_fns<LT, 17>(scan, fix); break;
    case 19: cov_fns<LT, 19>(scan, fix); break;
    case 21: cov_fns<LT, 21>(scan, fix); break;
    default: cov_fns<LT, 23>(scan, fix); break;
  }
}

// params: fastalign.policy_config.KernelParams (loss_type clip_cov | kl_cov).
// cov: fp32 [sum_v A, sum_v lp, n (for the means), n_local (for k)] or 0 (computed here);
// seed: int64 [1]. dlp may be 0 (forward only: the gradient is not written).
void policy_loss_cov_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask,
                         uintptr_t ref, uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t cov, uintptr_t seed,
                         uintptr_t row, uintptr_t dlp, const std::vector<double>& params) {
  Cfg c{};
  static_cast<PolicyParams&>(c) = params_from(params, "policy_loss_cov_fwd_cpu");
  c.B = B;
  c.T = T;
  c.iw_on = false;
  const int loss_type = c.loss_type, rollout = c.rollout;
  if (loss_type != kCLIPCOV && loss_type != kKLCOV)
    throw std::invalid_argument("policy_loss_cov_fwd_cpu: loss type must be clip_cov or kl_cov");
  if (B == 0) return;
  std::vector<float> zeros(static_cast<size_t>(T), 0.f), ones(static_cast<size_t>(T), 1.f);
  std::vector<uint8_t> no_sel(static_cast<size_t>(T), 0);
  const Inputs in{T, ptr<const float>(lp), ptr<const float>(old), ptr<const float>(adv), ptr<const float>(ref),
                  ptr<const float>(ent), ptr<const float>(roll), ptr<const float>(keep), nullptr,
                  ptr<const uint8_t>(mask), nullptr, ptr<float>(row), ptr<float>(dlp), zeros.data(), ones.data(),
                  no_sel.data()};

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
  CovScanFn scan = nullptr;
  CovFixFn fix = nullptr;
  if (loss_type == kCLIPCOV) cov_fns_flags<kCLIPCOV>(flags, scan, fix);
  else cov_fns_flags<kKLCOV>(flags, scan, fix);

  // 2. loss and gradient with nothing picked + candidates, one pass
  const int64_t nch = (T + kChunk - 1) / kChunk;
  std::vector<float> parts(static_cast<size_t>(B * nch * kPartCols));
  std::vector<RowCtx> ctxs(static_cast<size_t>(B));
  const int nthreads = omp_get_max_threads();
  std::vector<TopK> tops(static_cast<size_t>(nthreads));
  for (auto& tk : tops) {
    tk.k = P.k;
    tk.cap = static_cast<size_t>(std::max<int64_t>(2 * P.k, P.k + 256));
    tk.v.reserve(tk.cap);
  }
#pragma omp parallel num_threads(std::min(nthreads, threads_for(B * T)))
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
    float t[kRowCols] = {};
    for (int64_t ci = 0; ci < nch; ++ci)
      for (int j = 0; j < kRowCols; ++j) t[j] += parts[(i * nch + ci) * kPartCols + j];
    t[0] += ctxs[i].gmpo_row;
    float* out = in.row + i * kRowCols;
    for (int j = 0; j < kRowCols; ++j) out[j] = t[j];
  }
}


// params: fastalign.policy_config.KernelParams. Optional inputs are 0 pointers.
void policy_loss_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t ref,
                     uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t iw, uintptr_t sel, uintptr_t row,
                     uintptr_t dlp, const std::vector<double>& params) {
  Cfg c{};
  static_cast<PolicyParams&>(c) = params_from(params, "policy_loss_fwd_cpu");
  c.B = B;
  c.T = T;
  c.iw_on = iw != 0;
  const int loss_type = c.loss_type, rollout = c.rollout;
  // Absent optional inputs read from one shared row of neutral values (keeps the loops branch-free).
  std::vector<float> zeros(static_cast<size_t>(T), 0.f), ones(static_cast<size_t>(T), 1.f);
  std::vector<uint8_t> no_sel(static_cast<size_t>(T), 0);
  if (B == 0) return;
  const Inputs in{T, ptr<const float>(lp), ptr<const float>(old), ptr<const float>(adv), ptr<const float>(ref),
                  ptr<const float>(ent), ptr<const float>(roll), ptr<const float>(keep), ptr<const float>(iw),
                  ptr<const uint8_t>(mask), ptr<const uint8_t>(sel), ptr<float>(row), ptr<float>(dlp), zeros.data(),
                  ones.data(), no_sel.data()};
  const int flags = (ref ? kFlagKL : 0) | ((rollout == kTokTrunc || rollout == kTokMask) ? kFlagTokRoll : 0) |
                    (c.is_level != 0 ? kFlagSeq : 0) | ((ref && c.kl_rho != kKLRhoOff) ? kFlagKLRho : 0);
  auto launch = [&](auto tag) {
    constexpr int LT = decltype(tag)::value;
    void (*fn)(const Cfg&, const Row&) = nullptr;
    switch (flags & ~kFlagSeq) {
      case 0: fn = row_kernel<LT, 0>; break;
      case 1: fn = row_kernel<LT, 1>; break;
      case 2: fn = row_kernel<LT, 2>; break;
      case 3: fn = row_kernel<LT, 3>; break;
      case 17: fn = row_kernel<LT, 17>; break;
      default: fn = row_kernel<LT, 19>; break;
    }
    if constexpr (LT == kPPO || LT == kCISPO || LT == kSAPO) {  // the rows with a sequence level
      switch (flags) {
        case 8: fn = row_kernel<LT, 8>; break;
        case 9: fn = row_kernel<LT, 9>; break;
        case 10: fn = row_kernel<LT, 10>; break;
        case 11: fn = row_kernel<LT, 11>; break;
        case 25: fn = row_kernel<LT, 25>; break;
        case 27: fn = row_kernel<LT, 27>; break;
        default: break;
      }
    }
#pragma omp parallel for schedule(static) num_threads(threads_for(B * T))
    for (int64_t i = 0; i < B; ++i) fn(c, in.at(i));
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
    case kVESPO: launch(std::integral_constant<int, kVESPO>{}); break;
    case kDPPOTV: launch(std::integral_constant<int, kDPPOTV>{}); break;
    case kDPPOKL: launch(std::integral_constant<int, kDPPOKL>{}); break;
    case kDRO: launch(std::integral_constant<int, kDRO>{}); break;
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
#pragma omp parallel for schedule(static) num_threads(threads_for(B * T))
  for (int64_t i = 0; i < B; ++i) {
    const float g = grow[i * gstride];
    grads_row<GL, GE>(T, dlp + i * T, mask + i * T, g, -ent_coef * g, gl + (GL ? i * T : 0), ge + (GE ? i * T : 0));
  }
}

template <bool GL, bool GE>
void grads_rows_base(int64_t B, int64_t T, const float* dlp, const float* grow, int64_t gstride, const uint8_t* mask,
                     float ent_coef, float* gl, float* ge) {
#pragma omp parallel for schedule(static) num_threads(threads_for(B * T))
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
        "[B, 11] and d(row loss)/d(lp). Optional inputs are 0 pointers; params in KernelParams order.");
  m.def("policy_loss_param_names", &policy_param_names,
        "Names of the policy-loss launch parameters, in the order the kernels read them.");
  m.def("policy_loss_cov_fwd_cpu", &policy_loss_cov_fwd, py::call_guard<py::gil_scoped_release>(),
        "Clip-Cov / KL-Cov policy loss in one call: covariance sums (or given), loss and gradient with "
        "the selection candidates collected in the same pass, fix-up of the chunks holding picks. "
        "Per-row sums [B, 11] and d(row loss)/d(lp) (0 pointer: not written).");
  m.def("policy_loss_bwd_cpu", &policy_loss_bwd, py::call_guard<py::gil_scoped_release>(),
        "Backward of the row losses: d lp = dlp * g_row, d H = -ent_coef * mask * g_row (either output "
        "may be 0).");
}

}  // namespace fastalign
