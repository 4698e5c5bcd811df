// The fused token loop of the policy-gradient losses on the CPU (docs/math.md#policy-losses):
// one row (sequence) at a time, its tokens in chunks of kChunk. Per token t (fp32, v = mask):
//   pg_t, dpg_t = d_own_t + d_rho_t drho_t/dlp_t   the loss-type row (policy_loss_table.h)
//   w_t = w_tok_t * w_row  detached weights: rollout correction, entropy-quantile keep mask times
//                          importance weights, the off-policy mask (tokens with A_t < 0 of a far row)
//   K_t = KL_t * (rho if kl_rho else 1)
//   L_t  = w_t pg_t + kl_coef K_t - ent_coef H_t
//   dlp_t = v (w_t dpg_t + kl_coef dK_t/dlp_t)
// A term whose coefficient is 0 is left out (exactly 0, even where K_t or H_t is infinite or NaN); the
// metrics still sum K_t and H_t.
// Token level: drho_t/dlp_t = rho_t. Sequence level: ds_i/dlp_t = s_i v_t / n_i, so every valid
// token of the row also gets  s_i / n_i * sum_u v_u (w_u d_rho_u + kl_coef KL_u [kl_rho = grad]).
// Outputs per row (fixed-order sums, so bitwise deterministic): row[i, :] (policy_loss.h) and the
// per-token d(row loss)/d(lp); the aggregation (docs/math.md#aggregation) is a weighted sum of
// row losses done by the caller, and backward only scales dlp by the upstream gradient of each row.
//
// A source file that compiles this loop starts with  #pragma GCC optimize("no-tree-sink"):
// GCC sinks the loads of optional inputs into the masked branch, which leaves conditional
// (possibly trapping) loads that if-conversion rejects and the token loop stays scalar.
// Without load sinking the whole per-token body becomes straight-line SIMD code.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/cov_select_keys.h"
#include "cpu/isa_dispatch.h"
#include "cpu/policy_loss.h"
#include "cpu/policy_loss_table.h"
#include "cpu/vec_math.h"

namespace fastalign {
namespace policy {

// How a chunk learns which tokens Clip-Cov / KL-Cov picked:
//   kSelMask: from the uint8 selection row R.sel (none picked when it is the neutral row);
//   kScanClip / kScanKL: none picked yet; the chunk also writes each token's 32-bit order key
//   (common/cov_select_keys.h) and whether it is a candidate that may beat the caller's bound.
enum SelMode : int { kSelMask = 0, kScanClip = 1, kScanKL = 2 };

struct ScanOut {
  CovParams P;        // covariance means and selection parameters
  uint32_t bound_hi;  // order keys above this cannot be picked
  uint32_t* ord;      // [kChunk] order keys
  uint32_t* hit;      // [kChunk] 1 = candidate with order key <= bound_hi
};

// ---- pass 2 on tokens [t0, t0 + n) of a row: per-token loss, gradients and the chunk's metric
// sums part[0..kRowCols) (without the row-level gmpo term and vespo's row phi) plus, in part[kRowCols],
// the sequence-level gradient sum sum_v (w d_rho + kl_coef K [kl_rho = grad]).
// d(row loss)/d(lp) goes to c_dlp[0..n). Returns the number of hits in scan modes.
template <int LT, int FL, int SM>
FASTALIGN_KERNEL_BODY uint32_t chunk_body(const Cfg& c, const Row& R, const RowCtx& x, int64_t t0, int64_t n,
                                          float* __restrict c_dlp, float* part, uint32_t flat0, const ScanOut* scan) {
  constexpr bool KL = (FL & kFlagKL) != 0, TOKROLL = (FL & kFlagTokRoll) != 0;
  constexpr bool PLAIN = (FL & kFlagPlain) != 0, SEQ = (FL & kFlagSeq) != 0, KLRHO = (FL & kFlagKLRho) != 0;
  constexpr bool SCAN = SM != kSelMask;
  // configuration in locals: the stores below cannot alias it
  const LossConsts lc = loss_consts<LT>(c, x);
  const float kl_coef = c.kl_coef, ent_coef = c.entropy_coef;
  const float r_min = c.rollout_min, r_max = c.rollout_max;
  const int rollout = c.rollout;
  const KlChoice kc = kl_choice(c.kl_type, c.kl_straight != 0, c.kl_clamp != 0);  // kl_estimators.h
  const uint32_t m_klc = mask_of(kl_coef != 0.f), m_ent = mask_of(ent_coef != 0.f);  // terms switched on
  const float w_row = PLAIN ? 1.f : x.w_row, w_row_neg = PLAIN ? 1.f : x.w_row_neg;
  const float rho_row = x.rho_row, cap = c.log_ratio_cap;
  const bool kl_grad = c.kl_rho == kKLRhoGrad;
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
  float s_loss = 0.f, s_n = 0.f, s_clip = 0.f, s_low = 0.f, s_negl = 0.f, s_kl = 0.f, s_H = 0.f, s_sel_phi = 0.f;
  float s_clo = 0.f, s_chi = 0.f, s_grow = 0.f;
  uint32_t hits = 0;
#pragma omp simd reduction(+ : s_loss, s_n, s_clip, s_low, s_negl, s_kl, s_H, s_sel_phi, s_clo, s_chi, s_grow, hits)
  for (int64_t t = 0; t < n; ++t) {
    const bool v = vb[t] != 0.f;
    const float x_lp = c_lp[t], a = c_adv[t];
    const float l = x_lp - c_old[t];
    const float rho_c = exp_f32(clampf(l, -cap, cap));
    const float drho_c = ((l >= -cap) & (l <= cap)) ? rho_c : 0.f;
    // the importance ratio of the row and its own d/d(lp) (0 at sequence level: see d_row below)
    const float rho_is = SEQ ? rho_row : rho_c;
    const float sbt = SCAN ? 0.f : sb[t];
    if (SCAN) {
      bool cand;
      const uint32_t o = cov_order_t<SM == kScanClip ? 0 : 1>(P, flat0 + static_cast<uint32_t>(t), v, x_lp,
                                                              c_old[t], a, cand);
      const uint32_t h = cand & (o <= bound_hi);
      ord[t] = o;
      hit[t] = h;
      hits += h;
    }
    const LossTerm lt = loss_row<LT, SEQ>(lc, TokenIn{x_lp, c_old[t], a, l, rho_c, drho_c, rho_is, sbt != 0.f});
    // detached weights
    float w = PLAIN ? 1.f : c_keep[t] * (a < 0.f ? w_row_neg : w_row);
    if (TOKROLL) {
      const float r = exp_f32(clampf(rollout_log_ratio(c_old[t], c_roll[t]), -20.f, 20.f));
      w *= rollout_weight(r, trunc, r_min, r_max);
    }
    float L = LT == kGMPO ? 0.f : w * lt.pg;
    // a ratio that passes no gradient (clamped, or a NaN log-ratio) stops d_rho too, as torch.clamp does
    float g = LT == kGMPO ? lt.d_own : w * (lt.d_own + (lt.drho != 0.f ? lt.d_rho * lt.drho : 0.f));
    float grow = w * lt.d_rho;
    // KL term (x = ref - lp), times the ratio under kl_rho
    float klv = 0.f;
    if (KL) {
      const KlTerm kl = kl_term(x_lp - c_ref[t], kc);
      const float kv = kl.v, dkl = kl.dv;
      if (KLRHO) {  // K = KL * rho: d/dlp = rho dKL + [grad] KL drho (at sequence level through d_row)
        klv = rho_is * kv;
        // the token's own ratio carries the gradient at token level only (sequence level: see row_finish)
        g += keep_if(kl_coef * (rho_is * dkl + ((kl_grad && !SEQ) ? drho_c * kv : 0.f)), m_klc);
        grow += keep_if(kl_grad ? kl_coef * kv : 0.f, m_klc);
      } else {
        klv = kv;
        g += keep_if(kl_coef * dkl, m_klc);
      }
      L += keep_if(kl_coef * klv, m_klc);
    }
    const float h = PLAIN ? 0.f : c_ent[t];  // a row of zeros when no entropy is given
    L -= keep_if(ent_coef * h, m_ent);
    c_dlp[t] = v ? g : 0.f;
    s_loss += v ? L : 0.f;
    s_n += v ? 1.f : 0.f;
    s_clip += v ? lt.clip : 0.f;
    s_low += v ? lt.low : 0.f;
    s_negl += v ? -l : 0.f;
    s_kl += v ? klv : 0.f;
    s_H += v ? h : 0.f;
    s_sel_phi += v ? lt.sel_phi : 0.f;
    s_clo += v ? lt.clo : 0.f;
    s_chi += v ? lt.chi : 0.f;
    if (SEQ) s_grow += v ? grow : 0.f;
  }
  part[0] = s_loss; part[1] = s_n; part[2] = s_clip; part[3] = s_low;
  part[4] = s_negl; part[5] = s_kl; part[6] = s_H; part[7] = s_sel_phi;
  part[8] = s_clo; part[9] = s_chi; part[10] = 0.f; part[kRowCols] = s_grow;
  return hits;
}

// Row-level terms after the chunks: gmpo's row loss, vespo's phi, and at sequence level the
// gradient through s_i spread over the valid tokens.
FASTALIGN_KERNEL_BODY void row_finish(const Cfg& c, const Row& R, const RowCtx& x, float* t, float grow) {
  t[0] += x.gmpo_row;
  t[10] = x.vespo_phi;
  if (c.is_level != 0 && R.dlp != nullptr) {
    const float add = x.drho_row != 0.f ? grow * x.drho_row * x.inv_n : 0.f;  // a ratio that passes no gradient
    const uint8_t* __restrict mask = R.mask;
    float* __restrict dlp = R.dlp;
#pragma omp simd
    for (int64_t k = 0; k < c.T; ++k) dlp[k] += mask[k] != 0 ? add : 0.f;
  }
}

// One row, no selection scan: row_stats, then the chunks in order (fixed-order sums).
template <int LT, int FL>
FASTALIGN_KERNEL_BODY void row_body(const Cfg& c, const Row& R) {
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

}  // namespace policy
}  // namespace fastalign
