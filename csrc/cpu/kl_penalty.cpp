// kl_penalty on the CPU: the per-token KL estimate of the policy from a reference (kl_estimators.h, the same
// table as the fused policy loop) in one pass, and its gradient in lp in another.
//
// Forward:  out_t = KL(lp_t - ref_t), fp32.   Backward:  grad_t = g_t dKL/dlp_t (or one g for all), in lp's dtype.
// lp and ref are one kernel dtype (fp32, bf16 or fp16, read as fp32), contiguous. Elementwise, so results do
// not depend on the thread count (cpu/parallel.h).
#include <cstdint>
#include <stdexcept>

#include "cpu/isa_dispatch.h"
#include "cpu/kl_estimators.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

// KT (the estimator) is a template constant, so the terms of the other estimators fold away (k1 computes no exp)
template <int D, int KT>
FASTALIGN_KERNEL_BODY void kl_values(const typename Storage<D>::T* lp, const typename Storage<D>::T* ref, int64_t n,
                                     bool straight, bool kl_clamp, float* out) {
  const KlChoice k = kl_choice(KT, straight, kl_clamp);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) out[t] = kl_term(Storage<D>::load(lp[t]) - Storage<D>::load(ref[t]), k).v;
}

// g per element, or one g for every element (g_scalar: the gradient of a sum, which is not expanded)
template <int D, int KT>
FASTALIGN_KERNEL_BODY void kl_grads(const typename Storage<D>::T* lp, const typename Storage<D>::T* ref, int64_t n,
                                    bool straight, bool kl_clamp, const float* g, bool g_scalar,
                                    typename Storage<D>::T* grad) {
  const KlChoice k = kl_choice(KT, straight, kl_clamp);
  if (g_scalar) {
    const float g0 = g[0];
#pragma omp simd
    for (int64_t t = 0; t < n; ++t)
      grad[t] = Storage<D>::store(g0 * kl_term(Storage<D>::load(lp[t]) - Storage<D>::load(ref[t]), k).dv);
  } else {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t)
      grad[t] = Storage<D>::store(g[t] * kl_term(Storage<D>::load(lp[t]) - Storage<D>::load(ref[t]), k).dv);
  }
}

template <int D, int KT>
void run(uintptr_t lp_p, uintptr_t ref_p, int64_t n, bool straight, bool kl_clamp, float* out, const float* g,
         bool g_scalar, uintptr_t grad_p) {
  using T = typename Storage<D>::T;
  const T* lp = reinterpret_cast<const T*>(lp_p);
  const T* ref = reinterpret_cast<const T*>(ref_p);
  T* grad = reinterpret_cast<T*>(grad_p);
  const auto values = isa::best<kl_values<D, KT>>();
  const auto grads = isa::best<kl_grads<D, KT>>();
  parallel_for(n, threads_for(n), [&](int64_t t0, int64_t t1) {
    if (g) grads(lp + t0, ref + t0, t1 - t0, straight, kl_clamp, g_scalar ? g : g + t0, g_scalar, grad + t0);
    else values(lp + t0, ref + t0, t1 - t0, straight, kl_clamp, out + t0);
  });
}

template <int D>
void by_type(int kl_type, uintptr_t lp, uintptr_t ref, int64_t n, bool straight, bool kl_clamp, float* out,
             const float* g, bool g_scalar, uintptr_t grad) {
  switch (kl_type) {
    case kK1: return run<D, kK1>(lp, ref, n, straight, kl_clamp, out, g, g_scalar, grad);
    case kAbs: return run<D, kAbs>(lp, ref, n, straight, kl_clamp, out, g, g_scalar, grad);
    case kK2: return run<D, kK2>(lp, ref, n, straight, kl_clamp, out, g, g_scalar, grad);
    case kK3: return run<D, kK3>(lp, ref, n, straight, kl_clamp, out, g, g_scalar, grad);
    default: throw std::invalid_argument("fastalign: kl_type must be in [0, 3]");
  }
}

}  // namespace

FASTALIGN_BINDINGS(kl_penalty) {
  namespace py = pybind11;
  m.def(
      "kl_penalty_cpu",
      [](uintptr_t lp, uintptr_t ref, int dtype, int64_t n, int kl_type, bool straight, bool kl_clamp, uintptr_t out,
         uintptr_t g, bool g_scalar, uintptr_t grad) {
        if (g ? !grad : !out) throw std::invalid_argument("fastalign: kl_penalty_cpu has no output");
        FASTALIGN_DISPATCH_DTYPE(dtype, by_type<D>(kl_type, lp, ref, n, straight, kl_clamp, ptr<float>(out),
                                                   ptr<const float>(g), g_scalar, grad));
      },
      py::call_guard<py::gil_scoped_release>(),
      "The KL estimate per token (lp, ref, dtype, n, kl_type, straight, kl_clamp, out, g, g_scalar, grad): kl_type "
      "0 k1, 1 abs, 2 k2, 3 k3 (straight: k2's gradient); forward into out (fp32), or with g (fp32: n elements, or "
      "one with g_scalar) the gradient g dKL/dlp into grad (lp's dtype). lp and ref: n contiguous elements of one "
      "dtype.");
}

}  // namespace fastalign
