// The generalized Jensen-Shannon divergence between a student's and a teacher's distributions over
// one row (docs/math.md#distillation-divergence), written once for every C++ backend. With
// x = z / T, lps / lpt the student / teacher log-probs and p_s, p_t their probabilities:
//   beta = 0:  D = KL(p_t || p_s) = sum_j p_t (lpt - lps)
//   beta = 1:  D = KL(p_s || p_t) = sum_j p_s (lps - lpt)
//   else:      m = (1 - beta) p_s + beta p_t,  D = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
// (the mode and omb = 1 - beta from the double beta: within fp32 rounding of 0 or 1 it stays the JSD)
// and d D / d x_j (K: the row's KL(p_s || p_t) for beta = 1, KL(p_s || m) otherwise):
//   beta = 0:  p_s - p_t;   beta = 1:  p_s (lps - lpt - K);   else: (1 - beta) p_s (lps - log m - K).
// Log-probs are floored at -1e30 (common/softmax_stats.h), so a zero probability contributes 0.
#pragma once
#include "common/host_device.h"

namespace fastalign {
namespace divergence {

enum Mode : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

FASTALIGN_HD int mode_of(double beta) { return beta == 0.0 ? kForwardKL : (beta == 1.0 ? kReverseKL : kJSD); }

// The row's D term of one column (summed over j gives D). The log-probs come floored, so a zero
// probability gives 0 * (a finite difference) = 0 with no test, and a NaN propagates.
FASTALIGN_HD float term(int mode, float beta, float omb, float ps, float pt, float lps, float lpt, float lm) {
  if (mode == kForwardKL) return pt * (lpt - lps);
  if (mode == kReverseKL) return ps * (lps - lpt);
  return beta * (pt * (lpt - lm)) + omb * (ps * (lps - lm));
}

// The column's share of K (see above): reverse KL, KL(p_s || m) for the JSD, 0 for the forward KL.
FASTALIGN_HD float k_term(int mode, float ps, float lps, float lpt, float lm) {
  if (mode == kForwardKL) return 0.f;
  return ps * (lps - (mode == kReverseKL ? lpt : lm));
}

// d D / d x_j.
FASTALIGN_HD float grad(int mode, float omb, float ps, float pt, float lps, float lpt, float lm, float K) {
  if (mode == kForwardKL) return ps - pt;
  if (mode == kReverseKL) return ps * (lps - lpt - K);
  return omb * ps * (lps - lm - K);
}

}  // namespace divergence
}  // namespace fastalign
