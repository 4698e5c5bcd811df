// masked_whiten on the CPU (docs/math.md#advantages): x whitened over the tokens of a mask of weights m, in three
// passes of one call. With valid_t = (m_t != 0) (a NaN weight counts as valid), in float64:
//
//   N = sum m,  mean = sum_valid m x / max'(N),  S = sum_valid m (x - mean)^2      (max'(N): N, or 1 when N = 0)
//   unbiased:  inv = 1 / sqrt(S / (N - 1) + eps), NaN where N <= 1          (verl)
//   biased:    inv = 1 / sqrt(max(S / max'(N), eps))                        (OpenRLHF)
//   out_t = valid_t ? (x_t - mean) inv m_t : 0                              (x's dtype)
//
// A masked token is left out by selection: whatever x holds there (NaN, inf) changes nothing. The sums are taken
// over fixed blocks of kBlock tokens and the block sums added in order, so results do not depend on the thread
// count (cpu/parallel.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"
#include "registry.h"

namespace fastalign {
namespace {

constexpr int64_t kBlock = int64_t(1) << 14;

// Each loop computes both sides of a choice and selects one (w != 0 ? a : 0), so it vectorises; a masked x never
// reaches a sum or an output.

// s = {sum m, sum_valid m x} over [0, n)
template <typename X, typename M>
FASTALIGN_KERNEL_BODY void moments(const X* __restrict x, const M* __restrict m, int64_t n, double* s) {
  double sw = 0.0, swx = 0.0;
#pragma omp simd reduction(+ : sw, swx)
  for (int64_t t = 0; t < n; ++t) {
    const double w = static_cast<double>(m[t]), wx = w * static_cast<double>(x[t]);
    sw += w;
    swx += w != 0.0 ? wx : 0.0;
  }
  s[0] = sw;
  s[1] = swx;
}

// s = {sum_valid m (x - mean)^2}, taken as m ((x - mean)^2) as the torch ops take it
template <typename X, typename M>
FASTALIGN_KERNEL_BODY void squares(const X* __restrict x, const M* __restrict m, int64_t n, double mean, double* s) {
  double sq = 0.0;
#pragma omp simd reduction(+ : sq)
  for (int64_t t = 0; t < n; ++t) {
    const double w = static_cast<double>(m[t]), d = static_cast<double>(x[t]) - mean, wdd = w * (d * d);
    sq += w != 0.0 ? wdd : 0.0;
  }
  s[0] = sq;
}

template <typename X, typename M>
FASTALIGN_KERNEL_BODY void scale(const X* __restrict x, const M* __restrict m, int64_t n, double mean, double inv,
                                 X* __restrict out) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const double w = static_cast<double>(m[t]), y = (static_cast<double>(x[t]) - mean) * inv * w;
    out[t] = static_cast<X>(w != 0.0 ? y : 0.0);
  }
}

// f(begin, end, part) over the blocks of [0, n) (part: K doubles a block), then the parts added in block order
// into sums[0 .. K)
template <int K, typename F>
void block_sums(int64_t n, const F& f, double* sums) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> part(K * blocks, 0.0);
  parallel_for(blocks, threads_for(n), [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) f(k * kBlock, std::min(n, (k + 1) * kBlock), &part[K * k]);
  });
  std::fill(sums, sums + K, 0.0);
  for (int64_t k = 0; k < blocks; ++k) {
    for (int j = 0; j < K; ++j) sums[j] += part[K * k + j];
  }
}

template <typename X, typename M>
void whiten(const X* x, const M* m, int64_t n, double eps, bool unbiased, X* out) {
  const auto moments_fn = isa::best<moments<X, M>>();
  const auto squares_fn = isa::best<squares<X, M>>();
  const auto scale_fn = isa::best<scale<X, M>>();
  double first[2], S;  // {sum m, sum_valid m x}, sum_valid m (x - mean)^2
  block_sums<2>(n, [&](int64_t t0, int64_t t1, double* s) { moments_fn(x + t0, m + t0, t1 - t0, s); }, first);
  const double N = first[0], n_or_one = N > 0.0 ? N : 1.0;
  const double mean = first[1] / n_or_one;
  block_sums<1>(n, [&](int64_t t0, int64_t t1, double* s) { squares_fn(x + t0, m + t0, t1 - t0, mean, s); }, &S);
  double inv;
  if (unbiased) {
    inv = 1.0 / std::sqrt(S / (N > 1.0 ? N - 1.0 : std::numeric_limits<double>::quiet_NaN()) + eps);
  } else {
    const double var = S / n_or_one;
    inv = 1.0 / std::sqrt(var < eps ? eps : var);  // NaN stays NaN
  }
  parallel_for(n, threads_for(n),
               [&](int64_t t0, int64_t t1) { scale_fn(x + t0, m + t0, t1 - t0, mean, inv, out + t0); });
}

template <typename X>
void by_mask(uintptr_t x, uintptr_t m, int mask_dtype, int64_t n, double eps, bool unbiased, uintptr_t out) {
  const X* xp = ptr<const X>(x);
  X* op = ptr<X>(out);
  switch (mask_dtype) {
    case 0: return whiten(xp, ptr<const float>(m), n, eps, unbiased, op);
    case 1: return whiten(xp, ptr<const double>(m), n, eps, unbiased, op);
    default: throw std::invalid_argument("fastalign: masked_whiten mask dtype code must be 0 (fp32) or 1 (fp64)");
  }
}

}  // namespace

FASTALIGN_BINDINGS(masked_whiten) {
  namespace py = pybind11;
  m.def(
      "masked_whiten_cpu",
      [](uintptr_t x, bool x_double, uintptr_t mask, int mask_dtype, int64_t n, double eps, bool unbiased,
         uintptr_t out) {
        if (x_double) by_mask<double>(x, mask, mask_dtype, n, eps, unbiased, out);
        else by_mask<float>(x, mask, mask_dtype, n, eps, unbiased, out);
      },
      py::call_guard<py::gil_scoped_release>(),
      "x whitened over a mask of weights (x, x_double, mask, mask_dtype, n, eps, unbiased, out): x and out fp32 "
      "(fp64 with x_double), the mask fp32 (0) or fp64 (1); n contiguous elements each; float64 sums.");
}

}  // namespace fastalign
