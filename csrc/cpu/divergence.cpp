// The distillation divergence of rows of student and teacher logits (docs/math.md#distillation-divergence),
// on the CPU: per row, the generalized JSD D (common/divergence_math.h), the student's entropy at the
// temperature, optionally the student's NLL of a label at temperature 1 (Liger's hard loss), and, when
// gradients are asked for, d loss / d z_s = g_soft d D / d z_s + g_hard d NLL / d z_s written over the
// student row in place. Rows are fp32 (the blocks of the fused head), spread over threads by
// cpu/parallel.h; each row is computed by one thread, so results do not depend on the thread count.
//
// Per row, x = z / T: pass 1 the maxima of z (student, teacher; T > 0, so x's are at the same j);
// pass 2 the sums s, t of the student (entropy), s of the teacher and of the NLL; pass 3 D and K
// (the KL, or the TVD's sum p_s s_j, the gradient subtracts), or for the cosine distance its sums
// x_s . x_t, |x_s|^2, |x_t|^2; pass 4 the gradient. The mode (forward KL, reverse KL, JSD at beta,
// cosine, TVD) is the caller's.
// A row whose mask is 0 gives zeros (and a zero gradient row) without reading its logits; a label of
// ignore_index gives NLL 0 and no hard gradient; a label outside [0, V) a NaN NLL. A NaN logit makes the
// row's outputs (and gradient) NaN.
// Offsets from the max are formed as (z_j - max z) / T (token_stats.cpp says why), and 1 - beta comes
// from the double, so a beta within fp32 rounding of 0 or 1 stays the JSD.
// A row state (kStateCols floats: the two maxima and log-sums, the NLL's log-sum, K and the cosine's terms) may
// be written by a call without gradients and read by a later gradient call on the same rows (state_in), which
// then runs pass 4 alone: the backward of a forward that kept it (token_divergence).
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "common/divergence_math.h"
#include "common/softmax_stats.h"
#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kStateCols = 10;  // zmax_s, log_ss, zmax_t, log_st, log_s1, K, inv_ns, inv_nt, cos, cos_s

struct Maxima {
  float s, t;  // of the student's and the teacher's logits (also the student's at T = 1)
};

FASTALIGN_KERNEL_BODY Maxima row_maxima(const float* zs, const float* zt, int64_t V, float inv_t) {
  float ms = -kInf, mt = -kInf;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t j = 0; j < V; ++j) {
    ms = zs[j] > ms ? zs[j] : ms;
    mt = zt[j] > mt ? zt[j] : mt;
  }
  return {ms, mt};
}

struct Sums {
  float ss, ts, st, s1;
};

// rs, rt: the maxima, 0 for a row of only -inf
template <bool HARD>
FASTALIGN_KERNEL_BODY Sums row_sums(const float* zs, const float* zt, int64_t V, float inv_t, float rs, float rt) {
  float ss = 0.f, ts = 0.f, st = 0.f, s1 = 0.f;
#pragma omp simd reduction(+ : ss, ts, st, s1)
  for (int64_t j = 0; j < V; ++j) {
    const float ds = (zs[j] - rs) * inv_t;
    const float es = exp_f32(ds);
    ss += es;
    ts += es > 0.f ? es * ds : 0.f;
    st += exp_f32((zt[j] - rt) * inv_t);
    if (HARD) s1 += exp_f32(zs[j] - rs);
  }
  return {ss, ts, st, s1};
}

// The row's softmax states: (z_j - zmax_s) / T - log s_s is the student's log-prob (the offset first, so its
// error is its own rounding at any logit scale, not that of |lse|; common/softmax_stats.h), the same for the
// teacher; beta and 1 - beta (omb) of the JSD.
struct Row {
  float zmax_s, log_ss, zmax_t, log_st, beta, omb;
};

// log m = log((1 - beta) p_s + beta p_t), from the probabilities (floored at -1e30 where both underflow)
FASTALIGN_KERNEL_BODY float log_mixture(float ps, float pt, const Row& R) {
  return log_f32(R.omb * ps + R.beta * pt);
}

// pass 3: (D, K) of the row
template <int MODE>
FASTALIGN_KERNEL_BODY void row_divergence(const float* zs, const float* zt, int64_t V, float inv_t, Row R, float* d_out,
                                          float* k_out) {
  float d = 0.f, k = 0.f;
#pragma omp simd reduction(+ : d, k)
  for (int64_t j = 0; j < V; ++j) {
    const float lps = softmax::log_p((zs[j] - R.zmax_s) * inv_t, R.log_ss, 0.f);
    const float lpt = softmax::log_p((zt[j] - R.zmax_t) * inv_t, R.log_st, 0.f);
    const float ps = exp_f32(lps), pt = exp_f32(lpt);
    const float lm = MODE == divergence::kJSD ? log_mixture(ps, pt, R) : 0.f;
    d += divergence::term(MODE, R.beta, R.omb, ps, pt, lps, lpt, lm);
    k += divergence::k_term(MODE, ps, pt, lps, lpt, lm);
  }
  *d_out = d;
  *k_out = k;
}

// pass 4: the gradient over zs in place (each element read before it is written)
template <int MODE, bool HARD>
FASTALIGN_KERNEL_BODY void row_gradient(float* zs, const float* zt, int64_t V, float inv_t, Row R, float K,
                                        float g_soft, float g_hard, float log_s1) {
  const float gs = g_soft * inv_t;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float z = zs[j];
    const float lps = softmax::log_p((z - R.zmax_s) * inv_t, R.log_ss, 0.f);
    const float lpt = softmax::log_p((zt[j] - R.zmax_t) * inv_t, R.log_st, 0.f);
    const float ps = exp_f32(lps), pt = exp_f32(lpt);
    const float lm = MODE == divergence::kJSD ? log_mixture(ps, pt, R) : 0.f;
    float g = gs * divergence::grad(MODE, R.omb, ps, pt, lps, lpt, lm, K);
    if (HARD) g += g_hard * exp_f32(softmax::log_p(z - R.zmax_s, log_s1, 0.f));
    zs[j] = g;
  }
}

// the cosine distance's row sums: sum x_s x_t, sum x_s^2, sum x_t^2
FASTALIGN_KERNEL_BODY divergence::Cosine row_cosine(const float* zs, const float* zt, int64_t V, float inv_t) {
  float dot = 0.f, ss = 0.f, tt = 0.f;
#pragma omp simd reduction(+ : dot, ss, tt)
  for (int64_t j = 0; j < V; ++j) {
    const float xs = zs[j] * inv_t, xt = zt[j] * inv_t;
    dot += xs * xt;
    ss += xs * xs;
    tt += xt * xt;
  }
  return divergence::cos_of(dot, ss, tt);
}

// the cosine distance's gradient over zs in place
template <bool HARD>
FASTALIGN_KERNEL_BODY void row_cosine_gradient(float* zs, const float* zt, int64_t V, float inv_t, Row R,
                                               divergence::Cosine c, float g_soft, float g_hard, float log_s1) {
  const float gs = g_soft * inv_t;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float z = zs[j];
    float g = gs * divergence::cos_grad(c, z * inv_t, zt[j] * inv_t);
    if (HARD) g += g_hard * exp_f32(softmax::log_p(z - R.zmax_s, log_s1, 0.f));
    zs[j] = g;
  }
}

using DivergenceFn = void (*)(const float*, const float*, int64_t, float, Row, float*, float*);
using GradientFn = void (*)(float*, const float*, int64_t, float, Row, float, float, float, float);
using CosineGradientFn = void (*)(float*, const float*, int64_t, float, Row, divergence::Cosine, float, float, float);

// the (D, K) pass and the gradient passes (with and without the hard loss) of a per-column mode (every mode but
// the cosine's), picked once per call
struct ColumnPasses {
  DivergenceFn divergence;
  GradientFn gradient_hard, gradient_soft;
};

template <int MODE>
ColumnPasses column_passes() {
  return {isa::best<row_divergence<MODE>>(), isa::best<row_gradient<MODE, true>>(),
          isa::best<row_gradient<MODE, false>>()};
}

ColumnPasses column_passes(int mode) {
  switch (mode) {
    case divergence::kForwardKL: return column_passes<divergence::kForwardKL>();
    case divergence::kReverseKL: return column_passes<divergence::kReverseKL>();
    case divergence::kTVD: return column_passes<divergence::kTVD>();
    default: return column_passes<divergence::kJSD>();
  }
}

void rows(uintptr_t student, uintptr_t teacher, int64_t N, int64_t V, int64_t s_stride, int64_t t_stride, double inv_t_d,
          int mode, double beta_d, const float* mask, const int64_t* labels, int64_t ignore_index,
          const float* g_soft, const float* g_hard, float* div, float* ent, float* nll, float* state, bool state_in) {
  float* zs_base = reinterpret_cast<float*>(student);
  const float* zt_base = reinterpret_cast<const float*>(teacher);
  const float inv_t = float(inv_t_d), beta = float(beta_d), omb = float(1.0 - beta_d);
  const bool hard = labels != nullptr;
  const bool cosine = mode == divergence::kCosine;
  const auto max_fn = isa::best<row_maxima>();
  const auto sum_fn = hard ? isa::best<row_sums<true>>() : isa::best<row_sums<false>>();
  const ColumnPasses passes = column_passes(mode);
  const auto cos_fn = isa::best<row_cosine>();
  const CosineGradientFn cos_grad_fn =
      hard ? isa::best<row_cosine_gradient<true>>() : isa::best<row_cosine_gradient<false>>();
  parallel_for(N, threads_for(N * V * 4), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* zs = zs_base + r * s_stride;
      const float* zt = zt_base + r * t_stride;
      if (mask && mask[r] == 0.f) {
        div[r] = 0.f;
        ent[r] = 0.f;
        if (nll) nll[r] = 0.f;
        if (g_soft)
          for (int64_t j = 0; j < V; ++j) zs[j] = 0.f;
        continue;
      }
      const int64_t y = hard ? labels[r] : ignore_index;
      const bool labelled = hard && y != ignore_index;
      float* st = state ? state + r * kStateCols : nullptr;
      Row R;
      float K = 0.f, log_s1 = 0.f;
      divergence::Cosine c{};
      if (state_in) {  // passes 1-3 ran in the call that wrote the state
        R = Row{st[0], st[1], st[2], st[3], beta, omb};
        log_s1 = st[4];
        K = st[5];
        c = divergence::Cosine{st[6], st[7], st[8], st[9]};
      } else {
        const Maxima m = max_fn(zs, zt, V, inv_t);
        const float rs = m.s == -kInf ? 0.f : m.s, rt = m.t == -kInf ? 0.f : m.t;
        const Sums s = sum_fn(zs, zt, V, inv_t, rs, rt);
        const float log_ss = std::log(s.ss);
        R = Row{rs, log_ss, rt, std::log(s.st), beta, omb};
        ent[r] = softmax::entropy(log_ss, s.ts, s.ss);
        float D;
        if (cosine) {
          c = cos_fn(zs, zt, V, inv_t);
          D = 1.f - c.cos;
        } else {
          passes.divergence(zs, zt, V, inv_t, R, &D, &K);
        }
        div[r] = D;
        log_s1 = hard ? std::log(s.s1) : 0.f;
        if (nll) nll[r] = !labelled ? 0.f : (y >= 0 && y < V ? -softmax::logprob(zs[y], rs, log_s1) : kNaN);
        if (st) {
          const float row_state[kStateCols] = {R.zmax_s, R.log_ss, R.zmax_t, R.log_st, log_s1, K,
                                               c.inv_ns, c.inv_nt, c.cos, c.cos_s};
          for (int64_t i = 0; i < kStateCols; ++i) st[i] = row_state[i];
        }
      }
      if (g_soft) {
        const float gh = labelled && g_hard ? g_hard[r] : 0.f;
        if (cosine) cos_grad_fn(zs, zt, V, inv_t, R, c, g_soft[r], gh, log_s1);
        else (gh != 0.f ? passes.gradient_hard : passes.gradient_soft)(zs, zt, V, inv_t, R, K, g_soft[r], gh, log_s1);
        if (gh != 0.f) {
          if (y >= 0 && y < V) zs[y] -= gh;
          else
            for (int64_t j = 0; j < V; ++j) zs[j] = kNaN;
        }
      }
    }
  });
}

}  // namespace

FASTALIGN_BINDINGS(divergence) {
  namespace py = pybind11;
  m.def(
      "divergence_rows_cpu",
      [](uintptr_t student, uintptr_t teacher, int64_t N, int64_t V, int64_t s_stride, int64_t t_stride, double inv_t,
         int mode, double beta, uintptr_t mask, uintptr_t labels, int64_t ignore_index, uintptr_t g_soft,
         uintptr_t g_hard, uintptr_t div, uintptr_t ent, uintptr_t nll, uintptr_t state, bool state_in) {
        if (mode < divergence::kForwardKL || mode > divergence::kTVD) throw std::invalid_argument("mode");
        if (state_in && (!state || !g_soft)) throw std::invalid_argument("state_in needs a state and g_soft");
        rows(student, teacher, N, V, s_stride, t_stride, inv_t, mode, beta, ptr<const float>(mask),
             ptr<const int64_t>(labels),
             ignore_index, ptr<const float>(g_soft), ptr<const float>(g_hard), ptr<float>(div), ptr<float>(ent),
             ptr<float>(nll), ptr<float>(state), state_in);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Distillation divergence of fp32 rows: (student, teacher, N, V, s_stride, t_stride, inv_t, mode, beta, mask, "
      "labels, ignore_index, g_soft, g_hard, div, ent, nll, state, state_in); mode 0 forward KL, 1 reverse KL, 2 "
      "the generalized JSD at beta, 3 the cosine distance, 4 the total variation distance; with g_soft the weighted "
      "d loss / d z_s overwrites the student rows; null pointers (0) skip the mask, the labels (no NLL), the "
      "gradient, the NLL output and the row state ([N, 10] fp32: written, or read with state_in by a gradient "
      "call, which then writes no div, ent or nll).");
}

}  // namespace fastalign
