// The policy-gradient loss table (docs/math.md#policy-losses): one row per loss type, as the
// per-token term loss_row<LT> and the row-level quantities of pass 1 (row_stats).
//
// Per token t (fp32, v = mask), l = lp - old, rho = exp(clamp(l, -c, c)), c = log_ratio_cap
// (importance_sampling_level = sequence: rho = s_i = exp(clamp(mean_v l, -c, c)) for every
// token of the row); no gradient through rho where the clamp binds, as torch.clamp. A loss row gives pg_t and its derivative dpg_t = d_own_t + d_rho_t drho_t/dlp_t
// (d_rho: derivative in rho), plus the clip metrics. Loss types (LT), r1 = min(rho, delta):
//   ppo      L1 = -A r1, L2 = -A clip(rho, 1-el, 1+eh), max(L1, L2) (L2 only if strictly
//            larger), dual clip min(., -cA) for A < 0 (only if strictly larger)
//   gspo     rho = exp(min(mean_v l, 10)) per row, ppo clip; gradient d rho/d lp_t = rho, and 0
//            where mean_v l > 10 (the cap passes no gradient, as torch.clamp in verl); the token's
//            ratio exp(lp - sg(lp) + ...) is NaN where lp is not finite (+ (lp - lp))
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
// Sequence-level quantities (gspo's s_i, gmpo's means, vespo's weight, sequence rollout weights,
// the off-policy mask's mean KL) come from pass 1 over the row (row_stats).
// A NaN rollout log-prob is a log-ratio of 0 (an unscorable token); any other NaN propagates.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/isa_dispatch.h"
#include "cpu/policy_loss.h"
#include "cpu/vec_math.h"

namespace fastalign {
namespace policy {

constexpr float kHuge = std::numeric_limits<float>::infinity();

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

// Row-level quantities from pass 1 that the token loop needs.
struct RowCtx {
  float w_row, rho_row, gmpo_G, gmpo_row, vespo_logw, vespo_w, vespo_phi, inv_n;
  float drho_row;   // d rho_row / d(mean l): gspo and sequence level (0 where the cap binds)
  float w_row_neg;  // w_row of the tokens with A_t < 0: 0 when the off-policy mask drops them
};

// ---- pass 1: per-row sums (only what the configuration needs) ----
template <int LT, int FL>
FASTALIGN_KERNEL_BODY RowCtx row_stats(const Cfg& c, const Row& R) {
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
      const float kd_t = roll[t] - lp[t];  // off-policy KL evidence; a NaN (either side) is none, as TRL
      const float kd = kd_t == kd_t ? kd_t : 0.f;
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
  RowCtx x{1.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, inv_n, 0.f, 1.f};
  if (seq_roll) x.w_row = rollout_weight(std::exp(clampf(slr, -20.f, 20.f)), roll_trunc, r_min, r_max);
  // off-policy mask: a row whose mean KL exceeds the threshold drops its tokens of negative advantage
  // (gmpo, one loss per row: the whole row when its mean advantage is negative)
  const bool far = offpol && skd * inv_n > c.offpolicy_threshold;
  if (LT == kGMPO && far && sa * inv_n < 0.f) x.w_row = 0.f;
  x.w_row_neg = (far && LT != kGMPO) ? 0.f : x.w_row;
  if (LT == kGSPO) {
    const float mean_l = sl * inv_n;
    x.rho_row = std::exp(clampf(mean_l, -kHuge, 10.f));  // keeps NaN
    x.drho_row = mean_l <= 10.f ? x.rho_row : 0.f;      // torch.clamp(max=10): none above the cap (or at NaN)
  }
  if (c.is_level != 0) {
    const float mean_l = sl * inv_n, cap = c.log_ratio_cap;
    x.rho_row = std::exp(clampf(mean_l, -cap, cap));
    x.drho_row = ((mean_l >= -cap) & (mean_l <= cap)) ? x.rho_row : 0.f;
  }
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

// What the loss rows read of the configuration and of pass 1, in locals (the token loop's stores
// cannot alias them). Options off become bounds that never bind (no runtime branches in the loop,
// so it vectorises).
struct LossConsts {
  const Cfg& c;
  float el, eh, lo, hi, cis_lo, cis_hi, tau_pos, tau_neg, cov_kl, dro_beta, delta_b, dual_b;
  float rho_row, gmpo_G, vespo_logw, vespo_w, drho_row;
};

template <int LT>
FASTALIGN_KERNEL_BODY LossConsts loss_consts(const Cfg& c, const RowCtx& x) {
  // an option that is off is an infinite bound (FLT_MAX would bind on an overflowed ratio: rho = inf > FLT_MAX,
  // a finite loss and no gradient where the formula gives inf)
  constexpr float kOff = std::numeric_limits<float>::infinity();
  const bool has_delta = LT == kPPO || LT == kGSPO || LT == kDPPOTV || LT == kDPPOKL;
  return LossConsts{c, c.eps_low, c.eps_high, 1.f - c.eps_low, 1.f + c.eps_high, c.cispo_lo, c.cispo_hi,
                    c.tau_pos, c.tau_neg, c.cov_kl_coef, c.dro_beta,
                    (has_delta && c.delta > 0.f) ? c.delta : kOff,
                    (LT == kPPO && c.dual_clip > 0.f) ? c.dual_clip : kOff,
                    x.rho_row, x.gmpo_G, x.vespo_logw, x.vespo_w, x.drho_row};
}

// One token's inputs to a loss row. rho_c = exp(clamp(l, -c, c)) and drho_c its d/d(lp);
// rho_is: the importance ratio of the row (rho_c, or s_i at sequence level).
struct TokenIn {
  float lp, old, a, l, rho_c, drho_c, rho_is;
  bool picked;  // Clip-Cov / KL-Cov selection
};

// pg: the loss-type row; d_own: d pg / d lp through lp itself; d_rho: d pg / d rho and drho the
// ratio's own d/d(lp); clip, low (dual clip), clo, chi: the clip metrics; sel_phi: the per-token metric
// of row column 7 (1 for a token Clip-Cov / KL-Cov picked, vespo's phi_t).
struct LossTerm {
  float pg, d_own, d_rho, drho, clip, low, clo, chi, sel_phi;
};

// SEQ: importance_sampling_level = sequence, where the token's own ratio carries no gradient
// (the gradient through s_i is added per row: row_finish).
template <int LT, bool SEQ>
FASTALIGN_KERNEL_BODY LossTerm loss_row(const LossConsts& k, const TokenIn& x) {
  constexpr bool PPO_ROW = LT == kPPO || LT == kGSPO || LT == kCLIPCOV;
  // at sequence level the token's own ratio passes no gradient: selected, not multiplied by 0 (0 * inf = NaN
  // where a token's log-ratio overflows an uncapped exp)
  const float drho_tok = SEQ ? 0.f : x.drho_c;
  const float a = x.a, l = x.l;
  LossTerm o{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (PPO_ROW) {
    float rho = x.rho_is;
    o.drho = drho_tok;
    // gspo: the token's ratio exp(lp - sg(lp) + sg(log s_i)), NaN at a non-finite lp (lp - lp), as the definition
    if (LT == kGSPO) { rho = k.rho_row + (x.lp - x.lp); o.drho = k.drho_row; }
    if (LT == kCLIPCOV) { rho = exp_f32(l); o.drho = rho; }
    const float r1 = rho > k.delta_b ? k.delta_b : rho;
    const float dr1 = rho > k.delta_b ? 0.f : 1.f;
    const float L1 = -a * r1;
    const float L2 = -a * clampf(rho, k.lo, k.hi);
    const float dL2 = ((rho >= k.lo) & (rho <= k.hi)) ? -a : 0.f;
    const bool is_clip = L2 > L1;
    o.pg = is_clip ? L2 : L1;
    o.d_rho = is_clip ? dL2 : -a * dr1;
    o.clip = is_clip ? 1.f : 0.f;
    o.clo = ((a < 0.f) & (r1 < k.lo)) ? 1.f : 0.f;
    o.chi = ((a > 0.f) & (r1 > k.hi)) ? 1.f : 0.f;  // not L2 > L1: A r1 may overflow to inf on both sides
    if (LT == kPPO) {
      const float L3 = -k.dual_b * a;
      const bool is_low = (a < 0.f) & (o.pg > L3);
      o.pg = is_low ? L3 : o.pg;
      o.d_rho = is_low ? 0.f : o.d_rho;
      o.low = is_low ? 1.f : 0.f;
    }
    if (LT == kCLIPCOV) {
      o.sel_phi = x.picked ? 1.f : 0.f;
      o.pg = x.picked ? 0.f : o.pg;  // a picked token passes no gradient, even where exp(l) overflows
      o.d_rho = x.picked ? 0.f : o.d_rho;
      o.drho = x.picked ? 0.f : o.drho;
    }
  } else if (LT == kKLCOV) {
    const float rho = exp_f32(l);
    o.pg = -a * rho + (x.picked ? k.cov_kl * std::fabs(l) : 0.f);
    o.d_own = -a * rho + (x.picked ? k.cov_kl * (l > 0.f ? 1.f : (l < 0.f ? -1.f : 0.f)) : 0.f);
    o.sel_phi = x.picked ? 1.f : 0.f;
  } else if (LT == kCISPO) {
    const float w = clampf(x.rho_is, k.cis_lo, k.cis_hi);
    o.pg = -w * a * x.lp;
    o.d_own = -w * a;
    o.clip = ((x.rho_is < k.cis_lo) | (x.rho_is > k.cis_hi)) ? 1.f : 0.f;
    o.clo = ((a < 0.f) & (x.rho_is < k.cis_lo)) ? 1.f : 0.f;
    o.chi = ((a > 0.f) & (x.rho_is > k.cis_hi)) ? 1.f : 0.f;
  } else if (LT == kSAPO) {
    const float tau = a > 0.f ? k.tau_pos : k.tau_neg;
    const float s = 1.f / (1.f + exp_f32(-tau * (x.rho_is - 1.f)));
    o.pg = -(4.f / tau) * s * a;
    o.d_rho = -4.f * s * (1.f - s) * a;
    o.drho = drho_tok;
  } else if (LT == kREINFORCE) {
    o.pg = -a * x.lp;
    o.d_own = -a;
  } else if (LT == kVESPO) {
    const float phi = vespo_phi(k.c, a >= 0.f, k.vespo_logw, k.vespo_w);
    o.pg = -phi * a * x.lp;
    o.d_own = -phi * a;
    o.sel_phi = phi;
  } else if (LT == kDPPOTV || LT == kDPPOKL) {
    const float p = exp_f32(x.lp), p_old = exp_f32(x.old);
    bool ok_pos, ok_neg;
    if (LT == kDPPOTV) {
      ok_pos = p - p_old <= k.eh;
      ok_neg = p - p_old >= -k.el;
    } else {
      const float bkl = p_old * (x.old - x.lp) + (1.f - p_old) * std::log((1.f - p_old + 1e-8f) / (1.f - p + 1e-8f));
      ok_pos = (bkl <= k.eh) | (p <= p_old);
      ok_neg = (bkl <= k.el) | (p >= p_old);
    }
    const float kt = (a > 0.f ? ok_pos : ok_neg) ? 1.f : 0.f;
    const bool trunc_hit = x.rho_c > k.delta_b;
    const float wt = (trunc_hit ? k.delta_b : x.rho_c) * kt;
    o.pg = -wt * a * x.lp;
    o.d_own = -wt * a;
    o.clip = 1.f - kt;
    o.low = trunc_hit ? kt : 0.f;
  } else if (LT == kDRO) {
    o.pg = -a * x.lp + 0.5f * k.dro_beta * l * l;
    o.d_own = -a + k.dro_beta * l;
  } else if (LT == kGMPO) {
    const float dc = a > 0.f ? (l <= k.eh ? 1.f : 0.f) : (a < 0.f ? (l >= -k.el ? 1.f : 0.f) : 0.f);
    o.d_own = k.gmpo_G * dc;
    const bool out = (l < -k.el) | (l > k.eh);
    o.clip = out ? 1.f : 0.f;
    o.clo = (out & (a < 0.f)) ? 1.f : 0.f;
    o.chi = (out & (a > 0.f)) ? 1.f : 0.f;
  }
  return o;
}

}  // namespace policy
}  // namespace fastalign
