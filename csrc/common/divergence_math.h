// The generalized Jensen-Shannon divergence between a student's and a teacher's distributions over
// one row (docs/math.md#distillation-divergence), written once for every C++ backend. With
// x = z / T, lps / lpt the student / teacher log-probs and p_s, p_t their probabilities:
//   beta = 0:  D = KL(p_t || p_s) = sum_j p_t (lpt - lps)
//   beta = 1:  D = KL(p_s || p_t) = sum_j p_s (lps - lpt)
//   else:      m = (1 - beta) p_s + beta p_t,  D = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
// (omb = 1 - beta from the double beta: within fp32 rounding of 0 or 1 it stays the JSD)
// and d D / d x_j (K: the row's KL(p_s || p_t) for beta = 1, KL(p_s || m) otherwise):
//   beta = 0:  p_s - p_t;   beta = 1:  p_s (lps - lpt - K);   else: (1 - beta) p_s (lps - log m - K).
// Log-probs are floored at -1e30 (common/softmax_stats.h), so a zero probability contributes 0.
// kTVD, the total variation distance D = 1/2 sum_j |p_s - p_t|, with s_j = sign(p_s - p_t) (0 where equal):
//   K = sum_j p_s s_j,   d D / d x_j = 1/2 p_s (s_j - K).
// kCosine, the cosine distance of the two logit rows (Liger's cosine-similarity loss), D = 1 - cos(x_s, x_t),
// has no per-column log-prob terms: its row value and gradient are cos_of / cos_grad below.
#pragma once
#include <cmath>

#include "common/host_device.h"

namespace fastalign {
namespace divergence {

// The kernels' mode argument (the Python side picks it: ops/divergence.py divergence_mode).
enum Mode : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kCosine = 3, kTVD = 4 };

FASTALIGN_HD float sign(float d) { return float(d > 0.f) - float(d < 0.f); }

// KL(p || q)'s column p (lp - lq): +inf where q has no mass (lq at the floor) and p has some, as the divergence
// itself (the floored difference would give a huge finite number, ~1e30 p).
FASTALIGN_HD float kl_term(float p, float lp, float lq) {
  return (p > 0.f && lq <= -1e30f) ? INFINITY : p * (lp - lq);
}

// The row's D term of one column (summed over j gives D). The log-probs come floored, so a zero
// probability gives 0 * (a finite difference) = 0 with no test, and a NaN propagates.
FASTALIGN_HD float term(int mode, float beta, float omb, float ps, float pt, float lps, float lpt, float lm) {
  if (mode == kForwardKL) return kl_term(pt, lpt, lps);
  if (mode == kReverseKL) return kl_term(ps, lps, lpt);
  if (mode == kTVD) return 0.5f * fabsf(ps - pt);
  return beta * (pt * (lpt - lm)) + omb * (ps * (lps - lm));
}

// The column's share of K (see above): reverse KL, KL(p_s || m) for the JSD, p_s s_j for the TVD, 0 for
// the forward KL.
FASTALIGN_HD float k_term(int mode, float ps, float pt, float lps, float lpt, float lm) {
  if (mode == kForwardKL) return 0.f;
  if (mode == kTVD) return ps * sign(ps - pt);
  return ps * (lps - (mode == kReverseKL ? lpt : lm));
}

// d D / d x_j.
FASTALIGN_HD float grad(int mode, float omb, float ps, float pt, float lps, float lpt, float lm, float K) {
  if (mode == kForwardKL) return ps - pt;
  if (mode == kReverseKL) return ps * (lps - lpt - K);
  if (mode == kTVD) return 0.5f * ps * (sign(ps - pt) - K);
  return omb * ps * (lps - lm - K);
}

// Cosine distance D = 1 - dot / (max(|x_s|, 1e-12) max(|x_t|, 1e-12)) from the row sums dot = sum x_s x_t,
// ss = sum x_s^2, tt = sum x_t^2 (the norms floored as torch's F.normalize: a zero row has cosine 0, D = 1).
struct Cosine {
  float inv_ns, inv_nt, cos;
  float cos_s;  // cos where |x_s| is above the floor, else 0 (there the floored norm is a constant)
};

FASTALIGN_HD Cosine cos_of(float dot, float ss, float tt) {
  const float ns = sqrtf(ss), nt = sqrtf(tt);
  const float inv_ns = 1.f / (ns > 1e-12f ? ns : 1e-12f), inv_nt = 1.f / (nt > 1e-12f ? nt : 1e-12f);
  const float cos = dot * inv_ns * inv_nt;
  return {inv_ns, inv_nt, cos, ns <= 1e-12f ? 0.f : cos};  // a NaN norm keeps the NaN
}

// d D / d x_s,j = -(x_t,j / (|x_s| |x_t|) - cos x_s,j / |x_s|^2)
FASTALIGN_HD float cos_grad(const Cosine& c, float xs, float xt) {
  return c.inv_ns * (c.cos_s * xs * c.inv_ns - xt * c.inv_nt);
}

}  // namespace divergence
}  // namespace fastalign
