// Per-token statistics of a logits row, fused (docs/math.md#token-statistics), on the CPU.
//
// Forward, one row z[0..V) at a time (rows spread over threads by cpu/parallel.h), x = z / T:
// pass 1 the row max, pass 2 s, t (and q) relative to it; common/softmax_stats.h finishes
// lse, log-prob, entropy and sum p^2. The offsets x_j - m are formed as (z_j - max z) / T, a
// product after the difference: exactly 0 at the max at any temperature, where z_j / T - m would
// be fused into one FMA that keeps the rounding of m (a log-prob off by 1e-2 at T = 1e-6). A row of only -inf has no mass: lse = -inf and the other
// statistics NaN (as log_softmax); as a vocabulary piece it merges with weight 0.
//
// Backward (common/softmax_stats.h for the gradient): one pass over the row, with log c (the rounding
// of the saved lse where |lse| >= 32) from the forward, so p is exact to fp32 rounding at any logit
// scale. For a vocabulary piece of a row (the chunks of linear_logprobs) the saved lse is the whole
// row's and log c the merged one of the pieces. Rows whose label
// is ignore_index get zeros; a label outside [0, V) gives NaN statistics and is never an index.
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "common/softmax_stats.h"
#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

using softmax::RowLayout;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct RowStats {
  float m, z_max, z_ref, s, t, q;  // m = max x; z_ref = max z, or 0 for a row of only -inf (then s = t = q = 0)
};

// max_j z_j (T > 0, so x's max is at the same j)
template <int D>
FASTALIGN_KERNEL_BODY float row_max(const typename Storage<D>::T* z, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) {
    const float x = Storage<D>::load(z[j]);
    m = x > m ? x : m;
  }
  return m;
}

// WANT_Q: also q (sum p^2 is asked for).
template <int D, bool WANT_Q>
FASTALIGN_KERNEL_BODY RowStats row_stats(const typename Storage<D>::T* z, int64_t V, float inv_t) {
  const float z_max = row_max<D>(z, V);
  const float z_ref = z_max == -std::numeric_limits<float>::infinity() ? 0.f : z_max;
  float s = 0.f, t = 0.f, q = 0.f;
#pragma omp simd reduction(+ : s, t, q)
  for (int64_t j = 0; j < V; ++j) {
    const float d = (Storage<D>::load(z[j]) - z_ref) * inv_t;  // x_j - m
    const float e = exp_f32(d);
    s += e;
    t += e > 0.f ? e * d : 0.f;
    if (WANT_Q) q += e * e;
  }
  return {z_max * inv_t, z_max, z_ref, s, t, q};
}

// The first j of the largest logit, NaN left out; 0 for a row with no logit above -inf (only -inf and NaN), as
// the head path and the GPU kernels, whose running argmax starts at column 0 and moves on a strictly larger logit.
template <int D>
int64_t row_argmax(const typename Storage<D>::T* z, int64_t V, float z_max) {
  if (z_max == -std::numeric_limits<float>::infinity()) return 0;
  for (int64_t j = 0; j < V; ++j)
    if (Storage<D>::load(z[j]) == z_max) return j;
  return 0;
}

// Per-row outputs of the forward; a null pointer skips that output. A full row
// writes lse; a vocabulary piece writes its max and log s instead, so pieces
// merge without ever rounding m + log s.
struct FwdOut {
  float *lp, *ent, *sp2;
  int64_t* amax;
  float *lse, *row_max, *log_sum, *log_c;
};

// log c = log sum_j e^{x_j - lse} for the lse just rounded, where |lse| >= 32 (0 elsewhere): the rounding that
// backward removes, as z_ref / T - lse + log s with the product exact and the difference formed in double (the
// backward's offsets are fma(z, 1/T, -lse), and s sums e^{(z_j - z_ref) / T}). A row of no mass (lse = -inf) has none.
inline float lse_rounding(float z_ref, float inv_t, float lse, float log_s) {
  if (!(std::fabs(lse) >= softmax::kRenormaliseAbove) || !std::isfinite(lse)) return 0.f;
  return float((double(z_ref) * double(inv_t) - double(lse)) + double(log_s));
}

template <int D>
void forward(uintptr_t logits, RowLayout L, int64_t N, int64_t V, const int64_t* labels, float inv_t,
             int64_t ignore_index, FwdOut o) {
  using T = typename Storage<D>::T;
  const T* base = reinterpret_cast<const T*>(logits);
  const auto max_fn = isa::best<row_max<D>>();
  const auto stats_fn = o.sp2 ? isa::best<row_stats<D, true>>() : isa::best<row_stats<D, false>>();
  parallel_for(N, threads_for(N * V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* z = base + L.offset(r);
      const int64_t y = labels[r];
      if (y == ignore_index) {  // no statistics needed; the argmax (and a piece's max) are still reported
        if (o.lp) o.lp[r] = 0.f;
        if (o.ent) o.ent[r] = 0.f;
        if (o.sp2) o.sp2[r] = 0.f;
        if (o.lse) o.lse[r] = 0.f;
        if (o.log_c) o.log_c[r] = 0.f;
        if (o.log_sum) o.log_sum[r] = 0.f;
        if (o.amax || o.row_max) {
          const float z_max = max_fn(z, V);
          if (o.row_max) o.row_max[r] = z_max * inv_t;
          if (o.amax) o.amax[r] = row_argmax<D>(z, V, z_max);
        }
        continue;
      }
      const RowStats st = stats_fn(z, V, inv_t);
      const float log_s = std::log(st.s);
      if (o.amax) o.amax[r] = row_argmax<D>(z, V, st.z_max);
      const float lse = softmax::log_sum_exp(st.m, log_s);
      if (o.lse) o.lse[r] = lse;
      if (o.log_c) o.log_c[r] = lse_rounding(st.z_ref, inv_t, lse, log_s);
      if (o.row_max) o.row_max[r] = st.m;
      if (o.log_sum) o.log_sum[r] = log_s;
      // logprob(x_y, m, log s) with x_y - m as the offsets above: (z_y - max z) / T, and m = 0
      if (o.lp) o.lp[r] = (y >= 0 && y < V) ? softmax::logprob((Storage<D>::load(z[y]) - st.z_ref) * inv_t, 0.f, log_s) : kNaN;
      if (o.ent) o.ent[r] = softmax::entropy(log_s, st.t, st.s);
      if (o.sp2) o.sp2[r] = softmax::sum_p2(st.q, st.s);
    }
  });
}

// x_j - lse with the product z_j / T kept exact (one rounding, by std::fma, whatever the compiler contracts), as
// the forward's log c (lse_rounding) and the merged log c of vocabulary pieces (formed in float64) take it, so
// log c cancels the rounding of the saved lse at any temperature.
static inline float offset_from_lse(float z, float inv_t, float lse) { return std::fma(z, inv_t, -lse); }

// dx_j = g_lp ([j = y] - p_j) + the entropy and sum p^2 terms, in fp32 and rounded once to the logits' dtype (the
// label's g_lp added after a bf16 store would cancel against -g_lp p_y rounded: a wrong sign for a confident label).
template <int D>
FASTALIGN_KERNEL_BODY void row_backward(const typename Storage<D>::T* z, typename Storage<D>::T* dz, int64_t V,
                                        int64_t y, float inv_t, float lse, float log_c, float g_lp, float g_h, float h,
                                        float g_q, float sp2) {
  // dz may alias z (in-place backward): each element is read before it is written.
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float logp = softmax::log_p(offset_from_lse(Storage<D>::load(z[j]), inv_t, lse), 0.f, log_c);
    const float p = exp_f32(logp);
    const float at_label = j == y ? g_lp : 0.f;
    dz[j] = Storage<D>::store((softmax::logit_grad(p, logp, g_lp, g_h, h, g_q, sp2) + at_label) * inv_t);
  }
}

// Whole rows or vocabulary pieces of rows alike: log c per row is the caller's (the forward's for whole rows, the
// merged one for pieces; null: 0).
template <int D>
void backward(uintptr_t logits, RowLayout L, int64_t N, int64_t V, const int64_t* labels, float inv_t,
              int64_t ignore_index, const float* lse, const float* ent, const float* sp2, const float* g_lp,
              const float* g_h, const float* g_q, uintptr_t grad, RowLayout G, const float* log_c) {
  using T = typename Storage<D>::T;
  const T* zbase = reinterpret_cast<const T*>(logits);
  T* gbase = reinterpret_cast<T*>(grad);
  const auto row_fn = isa::best<row_backward<D>>();
  parallel_for(N, threads_for(N * V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* z = zbase + L.offset(r);
      T* dz = gbase + G.offset(r);
      const int64_t y = labels[r];
      if (y == ignore_index) {
        for (int64_t j = 0; j < V; ++j) dz[j] = Storage<D>::store(0.f);
        continue;
      }
      const float glp = g_lp ? g_lp[r] : 0.f;
      const float gh = (g_h && ent) ? g_h[r] : 0.f;
      const float gq = (g_q && sp2) ? g_q[r] : 0.f;
      row_fn(z, dz, V, y, inv_t, lse[r], log_c ? log_c[r] : 0.f, glp, gh, ent ? ent[r] : 0.f, gq, sp2 ? sp2[r] : 0.f);
    }
  });
}


// The two forward entry points differ only in which per-row outputs their pointers are.
using Outputs = FwdOut (*)(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t);

FwdOut whole_row_outputs(uintptr_t lp, uintptr_t ent, uintptr_t sp2, uintptr_t amax, uintptr_t lse, uintptr_t log_c) {
  return FwdOut{ptr<float>(lp), ptr<float>(ent), ptr<float>(sp2), ptr<int64_t>(amax), ptr<float>(lse), nullptr, nullptr,
                ptr<float>(log_c)};
}

FwdOut piece_outputs(uintptr_t ent, uintptr_t sp2, uintptr_t amax, uintptr_t row_max, uintptr_t log_sum, uintptr_t) {
  return FwdOut{nullptr, ptr<float>(ent), ptr<float>(sp2), ptr<int64_t>(amax), nullptr, ptr<float>(row_max),
                ptr<float>(log_sum), nullptr};
}

template <Outputs outputs>
void forward_entry(uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
                   uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t o0, uintptr_t o1, uintptr_t o2,
                   uintptr_t o3, uintptr_t o4, uintptr_t o5) {
  const RowLayout L{inner, s_outer, s_inner};
  const FwdOut o = outputs(o0, o1, o2, o3, o4, o5);
  FASTALIGN_DISPATCH_DTYPE(dtype, forward<D>(logits, L, N, V, ptr<const int64_t>(labels), float(inv_t), ignore_index, o));
}

// A vocabulary piece has no lse, so no log c of its own: five outputs.
void piece_forward_entry(uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer,
                         int64_t s_inner, uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t ent,
                         uintptr_t sp2, uintptr_t amax, uintptr_t row_max, uintptr_t log_sum) {
  forward_entry<piece_outputs>(logits, dtype, N, V, inner, s_outer, s_inner, labels, inv_t, ignore_index, ent, sp2,
                               amax, row_max, log_sum, 0);
}

void backward_entry(uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer,
                    int64_t s_inner, uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t lse,
                    uintptr_t log_c, uintptr_t ent, uintptr_t sp2, uintptr_t g_lp, uintptr_t g_h, uintptr_t g_q,
                    uintptr_t grad, int64_t g_outer, int64_t g_inner) {
  const RowLayout L{inner, s_outer, s_inner};
  const RowLayout G{inner, g_outer, g_inner};
  FASTALIGN_DISPATCH_DTYPE(dtype, backward<D>(logits, L, N, V, ptr<const int64_t>(labels), float(inv_t), ignore_index,
                                              ptr<const float>(lse), ptr<const float>(ent), ptr<const float>(sp2),
                                              ptr<const float>(g_lp), ptr<const float>(g_h), ptr<const float>(g_q),
                                              grad, G, ptr<const float>(log_c)));
}

}  // namespace

FASTALIGN_BINDINGS(token_stats) {
  namespace py = pybind11;
  m.def("token_stats_fwd_cpu", &forward_entry<whole_row_outputs>, py::call_guard<py::gil_scoped_release>(),
        "Forward token statistics over rows of logits: (logits, dtype, N, V, inner, s_outer, s_inner, labels, "
        "inv_t, ignore_index, lp, ent, sp2, amax, lse, log_c); null pointers (0) skip an output. log_c: the rounding "
        "of the fp32 lse that backward removes (log sum_j e^{x_j - lse} where |lse| >= 32, else 0).");
  m.def("token_stats_piece_fwd_cpu", &piece_forward_entry, py::call_guard<py::gil_scoped_release>(),
        "Forward statistics of a vocabulary piece of each row: entropy, sum p^2 and argmax within the piece, "
        "its max m and log s = log sum e^{x - m} (lse = m + log s), in the last five pointers "
        "(ent, sp2, amax, row_max, log_sum); null pointers (0) skip an output.");
  m.def("token_stats_bwd_cpu", &backward_entry, py::call_guard<py::gil_scoped_release>(),
        "Backward of token statistics over whole rows or vocabulary pieces of rows: (logits, dtype, N, V, inner, "
        "s_outer, s_inner, labels, inv_t, ignore_index, lse, log_c, ent, sp2, g_lp, g_h, g_q, grad, g_outer, "
        "g_inner) writes d(logits) (grad may equal logits, in place), given the whole row's lse, entropy, sum p^2 "
        "and log c, the rounding of the fp32 lse (the forward's, or the merged one of pieces; 0: none).");
}

}  // namespace fastalign
