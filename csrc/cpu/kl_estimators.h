// The per-token KL estimators (docs/math.md#kl-estimators): value and derivative in lp, fp32, for the fused
// policy loop (policy_loss_rows.h) and kl_penalty (kl_penalty.cpp). With d = lp - ref and x = ref - lp = -d:
//
//   k1   d                                            d/dlp: 1
//   abs  |d|                                                 sign(d) (0 at d = 0 and for NaN)
//   k2   d^2 / 2                                             d
//   k3   clamp(k3(clamp(x, -20, 20)), -10, 10),              -expm1(x), 0 where a clamp binds or x is NaN
//        k3(x) = e^x - x - 1 (vec_math.h: no cancellation near 0); kl_clamp off: no clamp, and every k3 passes
//        its gradient (an infinite or NaN x included), as torch.clamp and autograd do
//   NAME+ (straight-through): NAME's value, k2's derivative d (0 at an infinite d)
//
// The estimator is picked by bit masks (keep_if), not by branches, so a loop over tokens stays straight-line
// SIMD code; a term not picked is exactly 0 even where it is infinite or NaN.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/isa_dispatch.h"
#include "cpu/vec_math.h"

namespace fastalign {

enum KLType : int { kK1 = 0, kAbs, kK2, kK3 };

struct KlChoice {
  uint32_t k1, abs, k2, k3;  // the estimator
  uint32_t straight, own;    // whose derivative: k2's (NAME+) or the estimator's own
  float xlo, xhi, klo, khi;  // k3's clamps (+-inf without kl_clamp: bounds that never bind)
  bool open;                 // no clamp: every k3 passes its gradient
};

static inline KlChoice kl_choice(int kl_type, bool straight, bool kl_clamp) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  return KlChoice{mask_of(kl_type == kK1), mask_of(kl_type == kAbs), mask_of(kl_type == kK2), mask_of(kl_type == kK3),
                  mask_of(straight), mask_of(!straight), kl_clamp ? -20.f : -kInf, kl_clamp ? 20.f : kInf,
                  kl_clamp ? -10.f : -kInf, kl_clamp ? 10.f : kInf, !kl_clamp};
}

struct KlTerm {
  float v, dv;  // the estimate and its derivative in lp
};

// inlined into every loop that calls it (a call would keep the loop scalar)
FASTALIGN_KERNEL_BODY KlTerm kl_term(float d, const KlChoice& k) {
  const float x = -d;
  const float xc = clampf(x, k.xlo, k.xhi);
  const K3 k3 = k3_f32(xc);  // exp(xc) - xc - 1 and expm1(xc)
  const float k3c = clampf(k3.v, k.klo, k.khi);
  const bool k3_live = k.open | ((x >= k.xlo) & (x <= k.xhi) & (k3.v >= k.klo) & (k3.v <= k.khi));
  const float dk3 = k3_live ? -k3.expm1 : 0.f;
  const float sgn = d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f);
  const float v = keep_if(d, k.k1) + keep_if(std::fabs(d), k.abs) + keep_if(0.5f * d * d, k.k2) + keep_if(k3c, k.k3);
  const float own = keep_if(1.f, k.k1) + keep_if(sgn, k.abs) + keep_if(d, k.k2) + keep_if(dk3, k.k3);
  return KlTerm{v, keep_if(std::isinf(d) ? 0.f : d, k.straight) + keep_if(own, k.own)};
}

}  // namespace fastalign
