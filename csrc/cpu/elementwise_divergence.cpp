// Divergences between given distributions, element by element (docs/math.md#elementwise-divergence), on the CPU.
//
// Rows of input x and target y (fp32, bf16 or fp16, read as fp32), no softmax: x and y are log-probabilities or
// probabilities as given, and df/dx_j is the partial derivative in x_j alone. Per element (p = e^y, q = e^x;
// a term whose weight is 0 adds 0, so a zero probability adds nothing even where its log is -inf):
//
//   mode 0 forward KL (jsd, beta 0):   f = p (y - x)                                  df = -p
//   mode 1 reverse KL (jsd, beta 1):   f = q (x - y)                                  df = q (x - y) + q
//   mode 2 generalized JSD,            f = beta p (y - lm) + (1 - beta) q (x - lm)    df = (1 - beta) q (x - lm)
//          lm = log(beta p + (1 - beta) q)
//   mode 3 KL, probability target:     f = y (log max(y, eps) - x)                    df = -y
//   mode 4 KL, log-probability target: f = p (y - x)   (kl_div's terms, no zero rule) df = -p
//   mode 5 total variation, x, y probabilities: f = |x - y| / 2                      df = sign(x - y) / 2
//
// Forward: each row's sum of f (fp32), or every f (fp32). Gradient: g df in the input's dtype, g per row or per
// element. A row whose mask is 0 gives 0 (its elements and gradient 0) without reading its inputs. A NaN element
// makes its f, the row's sum and its df NaN. Each row is computed by one thread (cpu/parallel.h), so results do not
// depend on the thread count; fastalign/kernels/elementwise_divergence.py is the same table in Triton.
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

enum Mode : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kKL = 3, kKLLogTarget = 4, kTVD = 5 };

struct Coefs {
  float log_b, log_1mb, eps;  // log beta, log(1 - beta): the JSD's; the KL's floor
};

struct Term {
  float f, df;
};

// w d, 0 where the weight w is 0 (0 log 0 = 0; a NaN weight stays NaN)
static inline float weighted(float w, float d) { return w == 0.f ? 0.f : w * d; }

template <int MODE>
FASTALIGN_KERNEL_BODY Term term(float x, float y, const Coefs& c) {
  if (MODE == kForwardKL) {
    const float p = exp_f32(y);
    return {weighted(p, y - x), -p};
  }
  if (MODE == kReverseKL) {
    const float q = exp_f32(x);
    return {weighted(q, x - y), weighted(q, x - y + 1.f)};
  }
  if (MODE == kJSD) {
    // a = y + log beta, b = x + log(1 - beta): e^a = beta p, e^b = (1 - beta) q, lm = log(e^a + e^b) from the
    // larger, hi, and r = e^(lo - hi): lm = hi + log(1 + r), and the two weights are e^hi and e^hi r (two exps)
    const float a = y + c.log_b, b = x + c.log_1mb;
    const bool a_hi = a > b;
    const float hi = a_hi ? a : b, lo = a_hi ? b : a;
    const bool none = hi == -std::numeric_limits<float>::infinity();  // p = q = 0
    const float r = none ? 0.f : exp_f32(lo - hi), e_hi = exp_f32(hi);
    const float lm = none ? hi : hi + log_f32(1.f + r);
    const float bp = a_hi ? e_hi : e_hi * r, bq = a_hi ? e_hi * r : e_hi;  // beta p, (1 - beta) q
    const float df = weighted(bq, x - lm);
    return {weighted(bp, y - lm) + df, df};
  }
  if (MODE == kKL) return {y * (log_f32(y > c.eps ? y : c.eps) - x), -y};
  if (MODE == kKLLogTarget) {
    const float p = exp_f32(y);
    return {p * (y - x), -p};
  }
  const float d = x - y;
  return {0.5f * std::fabs(d), d > 0.f ? 0.5f : (d < 0.f ? -0.5f : d * 0.f)};  // 0 at d = 0, NaN for NaN
}

template <int D, int MODE>
FASTALIGN_KERNEL_BODY float row_sum(const typename Storage<D>::T* x, const typename Storage<D>::T* y, int64_t V,
                                    Coefs c) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < V; ++j) s += term<MODE>(Storage<D>::load(x[j]), Storage<D>::load(y[j]), c).f;
  return s;
}

template <int D, int MODE>
FASTALIGN_KERNEL_BODY void row_elements(const typename Storage<D>::T* x, const typename Storage<D>::T* y, int64_t V,
                                        Coefs c, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) out[j] = term<MODE>(Storage<D>::load(x[j]), Storage<D>::load(y[j]), c).f;
}

// G_ELEMENTS: g per element (g_elements), else g_row for the whole row; the KL's df reads y alone
template <int D, int MODE, bool G_ELEMENTS>
FASTALIGN_KERNEL_BODY void row_grad(const typename Storage<D>::T* x, const typename Storage<D>::T* y, int64_t V,
                                    Coefs c, float g_row, const float* g_elements, typename Storage<D>::T* dx) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float yj = Storage<D>::load(y[j]);
    const float xj = (MODE == kKL || MODE == kKLLogTarget) ? yj : Storage<D>::load(x[j]);
    dx[j] = Storage<D>::store((G_ELEMENTS ? g_elements[j] : g_row) * term<MODE>(xj, yj, c).df);
  }
}

struct Rows {
  uintptr_t x, y;
  int64_t N, V, x_stride, y_stride;
  const float* mask;
};

struct Outs {
  float *sums, *elements;
  int64_t e_stride;
  const float *g_rows, *g_elements;
  int64_t g_stride;
  uintptr_t grad;
  int64_t grad_stride;
};

template <int D, int MODE>
void rows(const Rows& R, Coefs c, const Outs& o) {
  using T = typename Storage<D>::T;
  const auto sum_fn = isa::best<row_sum<D, MODE>>();
  const auto elements_fn = isa::best<row_elements<D, MODE>>();
  const auto grad_fn = o.g_elements ? isa::best<row_grad<D, MODE, true>>() : isa::best<row_grad<D, MODE, false>>();
  const bool grad = o.g_rows || o.g_elements;
  parallel_for(R.N, threads_for(R.N * R.V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = reinterpret_cast<const T*>(R.x) + r * R.x_stride;
      const T* y = reinterpret_cast<const T*>(R.y) + r * R.y_stride;
      const bool keep = !R.mask || R.mask[r] != 0.f;
      if (grad) {
        T* dx = reinterpret_cast<T*>(o.grad) + r * o.grad_stride;
        if (keep)
          grad_fn(x, y, R.V, c, o.g_rows ? o.g_rows[r] : 0.f, o.g_elements ? o.g_elements + r * o.g_stride : nullptr,
                  dx);
        else
          for (int64_t j = 0; j < R.V; ++j) dx[j] = Storage<D>::store(0.f);
      } else if (o.elements) {
        float* e = o.elements + r * o.e_stride;
        if (keep) elements_fn(x, y, R.V, c, e);
        else
          for (int64_t j = 0; j < R.V; ++j) e[j] = 0.f;
      } else {
        o.sums[r] = keep ? sum_fn(x, y, R.V, c) : 0.f;
      }
    }
  });
}

template <int D>
void dispatch_mode(int mode, const Rows& R, Coefs c, const Outs& o) {
  switch (mode) {
    case kForwardKL: return rows<D, kForwardKL>(R, c, o);
    case kReverseKL: return rows<D, kReverseKL>(R, c, o);
    case kJSD: return rows<D, kJSD>(R, c, o);
    case kKL: return rows<D, kKL>(R, c, o);
    case kKLLogTarget: return rows<D, kKLLogTarget>(R, c, o);
    case kTVD: return rows<D, kTVD>(R, c, o);
    default: throw std::invalid_argument("fastalign: elementwise divergence mode must be in [0, 5]");
  }
}

}  // namespace

FASTALIGN_BINDINGS(elementwise_divergence) {
  namespace py = pybind11;
  m.def(
      "elementwise_divergence_cpu",
      [](uintptr_t x, uintptr_t y, int dtype, int64_t N, int64_t V, int64_t x_stride, int64_t y_stride, int mode,
         double log_b, double log_1mb, double eps, uintptr_t mask, uintptr_t sums, uintptr_t elements, int64_t e_stride,
         uintptr_t g_rows, uintptr_t g_elements, int64_t g_stride, uintptr_t grad, int64_t grad_stride) {
        const bool backward = g_rows || g_elements;
        if (backward ? !grad : !(sums || elements)) throw std::invalid_argument("no output");
        const Coefs c{float(log_b), float(log_1mb), float(eps)};
        const Rows R{x, y, N, V, x_stride, y_stride, ptr<const float>(mask)};
        const Outs o{ptr<float>(sums), ptr<float>(elements), e_stride, ptr<const float>(g_rows),
                     ptr<const float>(g_elements), g_stride, grad, grad_stride};
        FASTALIGN_DISPATCH_DTYPE(dtype, dispatch_mode<D>(mode, R, c, o));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Element-wise divergence of rows: (x, y, dtype, N, V, x_stride, y_stride, mode, log_b, log_1mb, eps, mask, "
      "sums, elements, e_stride, g_rows, g_elements, g_stride, grad, grad_stride); mode 0 forward KL, 1 reverse KL, "
      "2 the generalized JSD at beta (log_b, log_1mb: log beta, log(1 - beta)), 3 the KL of a probability target (eps floors its log), 4 of a log-probability "
      "target, 5 the total variation; forward: per-row sums or per-element terms (fp32); with g_rows or g_elements "
      "(fp32) the weighted derivative in x into grad (x's dtype). Null pointers (0) skip the mask and outputs.");
}

}  // namespace fastalign
