// Per-token statistics of a logits row, fused (docs/math.md#token-statistics), on the CPU.
//
// Forward, one row z[0..V) at a time (rows spread over threads by cpu/parallel.h), x = z / T:
//   m  = max_j x_j
//   s  = sum_j e^{x_j - m}          t = sum_j e^{x_j - m} (x_j - m)
//   q  = sum_j e^{2 (x_j - m)}
//   lse = m + log s,  logprob = (x_y - m) - log s,  entropy = log s - t / s,
//   sum_p2 = q / s^2
// Everything is relative to the row max, and the log-prob is formed from the
// small differences (x_y - m) and log s, never from x_y - lse: its error is the
// fp32 rounding of the log-prob itself at any logit scale (a constant row of
// 1e30 gives -log V). A row of only -inf has no mass: lse = -inf and the other
// statistics NaN (as log_softmax); as a vocabulary piece it merges with weight 0.
//
// Backward, with H the entropy and log p_j = (x_j - lse) - log c. The saved fp32
// lse carries the rounding of m + log s, up to ulp(lse) / 2: below |lse| = 32
// that is <= 2^-20, and c = 1. Above (large logits, low temperature: an error of
// 5e-4 at lse = 1e4) one extra pass forms c = sum_j e^{x_j - lse}, which is
// e^{-rounding}, and p is exact to fp32 rounding again:
//   dL/dx_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) + 2 g_q p_j (p_j - sum_p2)
//   dL/dz_j = dL/dx_j / T
// For a vocabulary piece of a row (the chunks of linear_logprobs) the saved lse
// is the whole row's and c is not formed. Rows whose label is ignore_index get
// zeros; a label outside [0, V) gives NaN statistics and is never an index.
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kRenormaliseAbove = 32.f;  // |lse| from which backward renormalises (ulp(32) / 2 = 2^-20);
                                           // linear_stats.RENORMALISE_ABOVE for vocabulary pieces

// Rows are addressed as (outer, inner) so [B, T, V] views with any leading
// strides need no copy: row r lives at (r / inner) * s_outer + (r % inner) * s_inner.
struct RowLayout {
  int64_t inner, s_outer, s_inner;
  inline int64_t offset(int64_t r) const { return (r / inner) * s_outer + (r % inner) * s_inner; }
};

struct RowStats {
  float m, ref, s, t, q;  // ref: m, or 0 for a row of only -inf (then s = t = q = 0)
};

#ifndef FASTALIGN_CPU_TARGETS  // the portable (clang) build defines it empty: no target_clones on templates
#define FASTALIGN_CPU_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif

template <int D>
FASTALIGN_CPU_TARGETS
float row_max(const typename Storage<D>::T* z, int64_t V, float inv_t) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) {
    const float x = Storage<D>::load(z[j]) * inv_t;
    m = x > m ? x : m;
  }
  return m;
}

template <int D>
FASTALIGN_CPU_TARGETS
RowStats row_stats(const typename Storage<D>::T* z, int64_t V, float inv_t, bool want_q) {
  const float m = row_max<D>(z, V, inv_t);
  const float ref = m == -std::numeric_limits<float>::infinity() ? 0.f : m;
  float s = 0.f, t = 0.f, q = 0.f;
  if (want_q) {
#pragma omp simd reduction(+ : s, t, q)
    for (int64_t j = 0; j < V; ++j) {
      const float d = Storage<D>::load(z[j]) * inv_t - ref;
      const float e = exp_f32(d);
      s += e;
      t += e > 0.f ? e * d : 0.f;
      q += e * e;
    }
  } else {
#pragma omp simd reduction(+ : s, t)
    for (int64_t j = 0; j < V; ++j) {
      const float d = Storage<D>::load(z[j]) * inv_t - ref;
      const float e = exp_f32(d);
      s += e;
      t += e > 0.f ? e * d : 0.f;
    }
  }
  return {m, ref, s, t, q};
}

template <int D>
int64_t row_argmax(const typename Storage<D>::T* z, int64_t V, float inv_t, float m) {
  for (int64_t j = 0; j < V; ++j)
    if (Storage<D>::load(z[j]) * inv_t == m) return j;
  return 0;  // only for rows of NaN
}

// Per-row outputs of the forward; a null pointer skips that output. A full row
// writes lse; a vocabulary piece writes its max and log s instead, so pieces
// merge without ever rounding m + log s.
struct FwdOut {
  float *lp, *ent, *sp2;
  int64_t* amax;
  float *lse, *row_max, *log_sum;
};

template <int D>
void forward(uintptr_t logits, RowLayout L, int64_t N, int64_t V, const int64_t* labels, float inv_t,
             int64_t ignore_index, FwdOut o) {
  using T = typename Storage<D>::T;
  const T* base = reinterpret_cast<const T*>(logits);
  parallel_for(N, threads_for(N * V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* z = base + L.offset(r);
      const int64_t y = labels[r];
      if (y == ignore_index) {  // no statistics needed; the argmax (and a piece's max) are still reported
        if (o.lp) o.lp[r] = 0.f;
        if (o.ent) o.ent[r] = 0.f;
        if (o.sp2) o.sp2[r] = 0.f;
        if (o.lse) o.lse[r] = 0.f;
        if (o.log_sum) o.log_sum[r] = 0.f;
        if (o.amax || o.row_max) {
          const float m = row_max<D>(z, V, inv_t);
          if (o.row_max) o.row_max[r] = m;
          if (o.amax) o.amax[r] = row_argmax<D>(z, V, inv_t, m);
        }
        continue;
      }
      const RowStats st = row_stats<D>(z, V, inv_t, o.sp2 != nullptr);
      const float log_s = std::log(st.s);
      if (o.amax) o.amax[r] = row_argmax<D>(z, V, inv_t, st.m);
      if (o.lse) o.lse[r] = st.m + log_s;
      if (o.row_max) o.row_max[r] = st.m;
      if (o.log_sum) o.log_sum[r] = log_s;
      if (o.lp) o.lp[r] = (y >= 0 && y < V) ? (Storage<D>::load(z[y]) * inv_t - st.ref) - log_s : kNaN;
      if (o.ent) o.ent[r] = log_s - st.t / st.s;
      if (o.sp2) o.sp2[r] = st.q / (st.s * st.s);
    }
  });
}

// log sum_j e^{x_j - lse}: 0 up to the rounding of a saved fp32 lse.
template <int D>
FASTALIGN_CPU_TARGETS
float log_mass(const typename Storage<D>::T* z, int64_t V, float inv_t, float lse) {
  float c = 0.f;
#pragma omp simd reduction(+ : c)
  for (int64_t j = 0; j < V; ++j) c += exp_f32(Storage<D>::load(z[j]) * inv_t - lse);
  return std::log(c);
}

template <int D>
FASTALIGN_CPU_TARGETS
void row_backward(const typename Storage<D>::T* z, typename Storage<D>::T* dz, int64_t V, float inv_t,
                  float lse, float log_c, float g_lp, float g_h, float h, float g_q, float sp2) {
  // dz may alias z (in-place backward): each element is read before it is written.
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    float logp = (Storage<D>::load(z[j]) * inv_t - lse) - log_c;
    logp = logp < -1e30f ? -1e30f : logp;  // -inf logits: p = 0 and no NaN from 0 * inf
    const float p = exp_f32(logp);
    const float g = -g_lp * p - g_h * p * (logp + h) + 2.f * g_q * p * (p - sp2);
    dz[j] = Storage<D>::store(g * inv_t);
  }
}

// whole_row: the rows are whole vocabulary rows (c formed here when |lse| >= 32); else pieces
// of rows, with log c per row given by the caller (log_c, or 0 when null).
template <int D>
void backward(uintptr_t logits, RowLayout L, int64_t N, int64_t V, const int64_t* labels, float inv_t,
              int64_t ignore_index, const float* lse, const float* ent, const float* sp2, const float* g_lp,
              const float* g_h, const float* g_q, uintptr_t grad, RowLayout G, bool whole_row,
              const float* log_c_in) {
  using T = typename Storage<D>::T;
  const T* zbase = reinterpret_cast<const T*>(logits);
  T* gbase = reinterpret_cast<T*>(grad);
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
      const float log_c = whole_row ? (std::fabs(lse[r]) >= kRenormaliseAbove ? log_mass<D>(z, V, inv_t, lse[r]) : 0.f)
                                    : (log_c_in ? log_c_in[r] : 0.f);
      row_backward<D>(z, dz, V, inv_t, lse[r], log_c, glp, gh, ent ? ent[r] : 0.f, gq, sp2 ? sp2[r] : 0.f);
      if (y >= 0 && y < V) dz[y] = Storage<D>::store(Storage<D>::load(dz[y]) + glp * inv_t);
    }
  });
}


}  // namespace

FASTALIGN_BINDINGS(token_stats) {
  namespace py = pybind11;
  m.def(
      "token_stats_fwd_cpu",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
         uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t lp, uintptr_t ent, uintptr_t sp2,
         uintptr_t amax, uintptr_t lse) {
        const RowLayout L{inner, s_outer, s_inner};
        const FwdOut o{ptr<float>(lp), ptr<float>(ent), ptr<float>(sp2), ptr<int64_t>(amax), ptr<float>(lse),
                       nullptr, nullptr};
        FASTALIGN_DISPATCH_DTYPE(dtype, forward<D>(logits, L, N, V, ptr<const int64_t>(labels), float(inv_t),
                                                   ignore_index, o));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Forward token statistics over rows of logits; null pointers (0) skip an output.");
  m.def(
      "token_stats_piece_fwd_cpu",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
         uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t ent, uintptr_t sp2, uintptr_t amax,
         uintptr_t row_max, uintptr_t log_sum) {
        const RowLayout L{inner, s_outer, s_inner};
        const FwdOut o{nullptr, ptr<float>(ent), ptr<float>(sp2), ptr<int64_t>(amax), nullptr, ptr<float>(row_max),
                       ptr<float>(log_sum)};
        FASTALIGN_DISPATCH_DTYPE(dtype, forward<D>(logits, L, N, V, ptr<const int64_t>(labels), float(inv_t),
                                                   ignore_index, o));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Forward statistics of a vocabulary piece of each row: entropy, sum p^2 and argmax within the piece, "
      "its max m and log s = log sum e^{x - m} (lse = m + log s); null pointers (0) skip an output.");
  m.def(
      "token_stats_bwd_cpu",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
         uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t lse, uintptr_t ent, uintptr_t sp2,
         uintptr_t g_lp, uintptr_t g_h, uintptr_t g_q, uintptr_t grad, int64_t g_outer, int64_t g_inner) {
        const RowLayout L{inner, s_outer, s_inner};
        const RowLayout G{inner, g_outer, g_inner};
        FASTALIGN_DISPATCH_DTYPE(dtype, backward<D>(logits, L, N, V, ptr<const int64_t>(labels), float(inv_t),
                                                    ignore_index, ptr<const float>(lse), ptr<const float>(ent),
                                                    ptr<const float>(sp2), ptr<const float>(g_lp),
                                                    ptr<const float>(g_h), ptr<const float>(g_q), grad, G, true,
                                                    nullptr));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Backward of token statistics: writes d(logits) (grad may equal logits for in-place).");
  m.def(
      "token_stats_piece_bwd_cpu",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
         uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t lse, uintptr_t log_c, uintptr_t ent,
         uintptr_t sp2, uintptr_t g_lp, uintptr_t g_h, uintptr_t g_q, uintptr_t grad, int64_t g_outer,
         int64_t g_inner) {
        const RowLayout L{inner, s_outer, s_inner};
        const RowLayout G{inner, g_outer, g_inner};
        FASTALIGN_DISPATCH_DTYPE(dtype, backward<D>(logits, L, N, V, ptr<const int64_t>(labels), float(inv_t),
                                                    ignore_index, ptr<const float>(lse), ptr<const float>(ent),
                                                    ptr<const float>(sp2), ptr<const float>(g_lp),
                                                    ptr<const float>(g_h), ptr<const float>(g_q), grad, G, false,
                                                    ptr<const float>(log_c)));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Backward over a vocabulary piece of each row, given the whole row's lse / entropy / sum p^2 and "
      "optionally log c = log sum_j e^{x_j - lse} over the whole row (0: null).");
}

}  // namespace fastalign
