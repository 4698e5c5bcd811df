// Per-token statistics of a logits row, fused (docs/math.md#token-statistics), on the CPU.
//
// Forward, one row z[0..V) at a time (OpenMP over rows), x = z / T:
//   m  = max_j x_j
//   s  = sum_j e^{x_j - m}          t = sum_j e^{x_j - m} (x_j - m)
//   q  = sum_j e^{2 (x_j - m)}
//   lse = m + log s,  logprob = x_y - lse,  entropy = log s - t / s,
//   sum_p2 = q / s^2
// Everything is relative to the row max, so logits of 1e4 lose nothing.
//
// Backward, with log p_j = x_j - lse and H the entropy:
//   dL/dx_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) + 2 g_q p_j (p_j - sum_p2)
//   dL/dz_j = dL/dx_j / T
// Rows whose label is ignore_index get zeros; a label outside [0, V) gives NaN
// statistics and is never used as an index.
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Rows are addressed as (outer, inner) so [B, T, V] views with any leading
// strides need no copy: row r lives at (r / inner) * s_outer + (r % inner) * s_inner.
struct RowLayout {
  int64_t inner, s_outer, s_inner;
  inline int64_t offset(int64_t r) const { return (r / inner) * s_outer + (r % inner) * s_inner; }
};

struct RowStats {
  float m, s, t, q;
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
  float s = 0.f, t = 0.f, q = 0.f;
  if (want_q) {
#pragma omp simd reduction(+ : s, t, q)
    for (int64_t j = 0; j < V; ++j) {
      const float d = Storage<D>::load(z[j]) * inv_t - m;
      const float e = exp_f32(d);
      s += e;
      t += e > 0.f ? e * d : 0.f;
      q += e * e;
    }
  } else {
#pragma omp simd reduction(+ : s, t)
    for (int64_t j = 0; j < V; ++j) {
      const float d = Storage<D>::load(z[j]) * inv_t - m;
      const float e = exp_f32(d);
      s += e;
      t += e > 0.f ? e * d : 0.f;
    }
  }
  return {m, s, t, q};
}

template <int D>
int64_t row_argmax(const typename Storage<D>::T* z, int64_t V, float inv_t, float m) {
  for (int64_t j = 0; j < V; ++j)
    if (Storage<D>::load(z[j]) * inv_t == m) return j;
  return 0;  // only for rows of NaN
}

template <int D>
void forward(uintptr_t logits, RowLayout L, int64_t N, int64_t V, const int64_t* labels, float inv_t,
             int64_t ignore_index, float* lp, float* ent, float* sp2, int64_t* amax, float* lse) {
  using T = typename Storage<D>::T;
  const T* base = reinterpret_cast<const T*>(logits);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    const T* z = base + L.offset(r);
    const int64_t y = labels[r];
    if (y == ignore_index) {  // no statistics needed; the argmax is still reported
      lp[r] = 0.f;
      if (ent) ent[r] = 0.f;
      if (sp2) sp2[r] = 0.f;
      lse[r] = 0.f;
      if (amax) amax[r] = row_argmax<D>(z, V, inv_t, row_max<D>(z, V, inv_t));
      continue;
    }
    const RowStats st = row_stats<D>(z, V, inv_t, sp2 != nullptr);
    const float log_s = std::log(st.s);
    if (amax) amax[r] = row_argmax<D>(z, V, inv_t, st.m);
    lse[r] = st.m + log_s;
    lp[r] = (y >= 0 && y < V) ? Storage<D>::load(z[y]) * inv_t - lse[r] : kNaN;
    if (ent) ent[r] = log_s - st.t / st.s;
    if (sp2) sp2[r] = st.q / (st.s * st.s);
  }
}

template <int D>
FASTALIGN_CPU_TARGETS
void row_backward(const typename Storage<D>::T* z, typename Storage<D>::T* dz, int64_t V, float inv_t,
                  float lse, float g_lp, float g_h, float h, float g_q, float sp2) {
  // dz may alias z (in-place backward): each element is read before it is written.
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    float logp = Storage<D>::load(z[j]) * inv_t - lse;
    logp = logp < -1e30f ? -1e30f : logp;  // -inf logits: p = 0 and no NaN from 0 * inf
    const float p = exp_f32(logp);
    const float g = -g_lp * p - g_h * p * (logp + h) + 2.f * g_q * p * (p - sp2);
    dz[j] = Storage<D>::store(g * inv_t);
  }
}

template <int D>
void backward(uintptr_t logits, RowLayout L, int64_t N, int64_t V, const int64_t* labels, float inv_t,
              int64_t ignore_index, const float* lse, const float* ent, const float* sp2, const float* g_lp,
              const float* g_h, const float* g_q, uintptr_t grad, RowLayout G) {
  using T = typename Storage<D>::T;
  const T* zbase = reinterpret_cast<const T*>(logits);
  T* gbase = reinterpret_cast<T*>(grad);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < N; ++r) {
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
    row_backward<D>(z, dz, V, inv_t, lse[r], glp, gh, ent ? ent[r] : 0.f, gq, sp2 ? sp2[r] : 0.f);
    if (y >= 0 && y < V) dz[y] = Storage<D>::store(Storage<D>::load(dz[y]) + glp * inv_t);
  }
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
        FASTALIGN_DISPATCH_DTYPE(dtype, forward<D>(logits, L, N, V, ptr<const int64_t>(labels), float(inv_t),
                                                   ignore_index, ptr<float>(lp), ptr<float>(ent), ptr<float>(sp2),
                                                   ptr<int64_t>(amax), ptr<float>(lse)));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Forward token statistics over rows of logits; null pointers (0) skip an output.");
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
                                                    ptr<const float>(g_h), ptr<const float>(g_q), grad, G));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Backward of token statistics: writes d(logits) (grad may equal logits for in-place).");
}

}  // namespace fastalign
