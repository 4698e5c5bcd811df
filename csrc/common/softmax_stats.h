// Softmax statistics of one logits row (docs/math.md#token-statistics), shared by the C++ CPU
// kernels (csrc/cpu/token_stats.cpp) and the CUDA kernels (csrc/cuda/token_stats.cu), so both
// finish the same formulas. With x = z / T, m the row max and
//   s = sum_j e^{x_j - m},  t = sum_j e^{x_j - m} (x_j - m),  q = sum_j e^{2 (x_j - m)}:
//   lse = m + log s,  logprob = (x_y - m) - log s,  entropy = log s - t / s,  sum_p2 = q / s^2
// (x_y - m first: the log-prob's error is its own fp32 rounding at any logit scale, never that
// of |max|). Backward, with H the entropy and log p_j = (x_j - lse) - log c:
//   dL/dx_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) + 2 g_q p_j (p_j - sum_p2)
// The saved fp32 lse carries the rounding of m + log s, up to ulp(lse) / 2: below |lse| = 32
// that is <= 2^-20 and c = 1; above, the backward forms log c = log sum_j e^{x_j - lse}.
// Each backend sums s, t, q and c its own way (a two-pass row on the CPU, an online rescaled
// state per thread on the GPU) and brings its own exp.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace fastalign {
namespace softmax {

constexpr float kRenormaliseAbove = 32.f;  // |lse| from which backward forms log c (ulp(32) / 2 = 2^-20);
                                           // linear_stats.RENORMALISE_ABOVE for vocabulary pieces

// Rows are addressed as (outer, inner) so [B, T, V] views with any leading strides need no copy:
// row r lives at (r / inner) * s_outer + (r % inner) * s_inner.
struct RowLayout {
  int64_t inner, s_outer, s_inner;
  FASTALIGN_HD int64_t offset(int64_t r) const { return (r / inner) * s_outer + (r % inner) * s_inner; }
};

FASTALIGN_HD float log_sum_exp(float m, float log_s) { return m + log_s; }
// m: the max the sums are relative to
FASTALIGN_HD float logprob(float x_y, float m, float log_s) { return (x_y - m) - log_s; }
FASTALIGN_HD float entropy(float log_s, float t, float s) { return log_s - t / s; }
FASTALIGN_HD float sum_p2(float q, float s) { return q / (s * s); }

// log p_j, floored at -1e30 so a -inf logit gives p = 0 and p (log p + H) = 0, not 0 * inf; NaN stays NaN.
FASTALIGN_HD float log_p(float x, float lse, float log_c) {
  const float lp = (x - lse) - log_c;
  return lp < -1e30f ? -1e30f : lp;
}

// dL/dx_j without the label's g_lp term, from p_j = exp(log p_j).
FASTALIGN_HD float logit_grad(float p, float logp, float g_lp, float g_h, float h, float g_q, float sp2) {
  return -g_lp * p - g_h * p * (logp + h) + 2.f * g_q * p * (p - sp2);
}

}  // namespace softmax
}  // namespace fastalign
