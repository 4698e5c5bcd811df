// Backward of the policy-gradient row losses on the CPU: the forward already wrote
// d(row loss)/d(lp), so the backward scales it by each row's upstream gradient g_i:
//   gl[i, t] = dlp[i, t] g_i,   ge[i, t] = -ent_coef m[i, t] g_i   (g_i = grow[i * gstride])
// one pass over the rows; either output may be absent (0).
#include <cstdint>

#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"
#include "cpu/policy_loss.h"
#include "registry.h"

namespace fastalign {
namespace policy {
namespace {

template <bool GL, bool GE>
FASTALIGN_KERNEL_BODY void grads_row(int64_t T, const float* __restrict dlp, const uint8_t* __restrict mask, float g,
                                     float ge_v, float* __restrict gl, float* __restrict ge) {
  if (GL) {
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) gl[t] = dlp[t] * g;
  }
  if (GE) {
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) ge[t] = mask[t] != 0 ? ge_v : 0.f;
  }
}

}  // namespace

void policy_loss_bwd(int64_t B, int64_t T, uintptr_t dlp, uintptr_t grow, int64_t gstride, uintptr_t mask,
                     double ent_coef, uintptr_t gl, uintptr_t ge) {
  if (B == 0 || (!gl && !ge)) return;
  auto* f = gl && ge ? isa::best<grads_row<true, true>>()
                     : gl ? isa::best<grads_row<true, false>>() : isa::best<grads_row<false, true>>();
  const float* d = ptr<const float>(dlp);
  const float* g_rows = ptr<const float>(grow);
  const uint8_t* m = ptr<const uint8_t>(mask);
  float* gl_p = ptr<float>(gl);
  float* ge_p = ptr<float>(ge);
  const float coef = float(ent_coef);
#pragma omp parallel for schedule(static) num_threads(threads_for(B * T))
  for (int64_t i = 0; i < B; ++i) {
    const float g = g_rows[i * gstride];
    f(T, d + i * T, m + i * T, g, -coef * g, gl_p ? gl_p + i * T : nullptr, ge_p ? ge_p + i * T : nullptr);
  }
}

}  // namespace policy
}  // namespace fastalign
