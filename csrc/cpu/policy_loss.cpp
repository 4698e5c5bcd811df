// Policy-gradient losses of SPEC §3 with the terms of §3.2, fused, on the CPU.
//
// One row (sequence) i at a time, OpenMP over rows. Per token t (fp32, v = mask):
//   l = lp - old,  rho = exp(clamp(l, -20, 20))
//   pg_t, dpg_t           the loss-type row of the table below and its d/d(lp)
//   w_t = w_tok_t * w_row  detached weights: rollout correction, entropy-quantile
//                          keep mask, sequence off-policy mask
//   L_t  = w_t pg_t + kl_coef KL_t - ent_coef H_t
//   dlp_t = v (w_t dpg_t + kl_coef dKL_t),   dH_t = -v ent_coef
// Sequence-level quantities (gspo's s_i, gmpo's means, sequence rollout weights,
// the off-policy mask) come from a first pass over the row. Outputs per row
// (fixed-order sums, so bitwise deterministic):
//   row[i, :] = [sum v L, n, #clipped, #dual-clipped, sum v(-l), sum v KL, sum v H, #selected]
// and the per-token d(row loss)/d(lp), d/d(H); the aggregation (SPEC §4) is a
// weighted sum of row losses done by the caller, and backward only scales dlp by
// the upstream gradient of each row.
//
// Loss types (LT):
//   ppo      L1 = -A min(rho, delta), L2 = -A clip(rho, 1-el, 1+eh), max(L1, L2) (L2 only if
//            strictly larger), dual clip min(., -cA) for A < 0 (only if strictly larger)
//   gspo     rho = exp(min(mean_v l, 10)) per row (gradient d rho/d lp_t = rho), ppo clip
//   cispo    -sg(clip(rho, lo, hi)) A lp
//   sapo     -(4/tau) sigma(tau (rho - 1)) A, tau = tau_pos if A > 0 else tau_neg
//   reinforce -A lp
//   gmpo     c_t = A > 0 ? min(l, eh) : A < 0 ? max(l, -el) : 0;
//            row loss -exp(mean_v c) mean_v A times sum_t v w_tok_t
//   clip_cov ppo clip on exp(l) (no clamps, no dual clip), selected tokens' pg set to 0
//   kl_cov   -A exp(l) + cov_kl_coef |l| on selected tokens
// GCC sinks the loads of optional inputs into the masked branch, which leaves conditional
// (possibly trapping) loads that if-conversion rejects and the token loop stays scalar.
// Without load sinking the whole per-token body becomes straight-line SIMD code.
#pragma GCC optimize("no-tree-sink")
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include <pybind11/stl.h>

#include "cpu/vec_math.h"
#include "registry.h"

namespace fastalign {
namespace {

enum LossType : int { kPPO = 0, kGSPO, kCISPO, kSAPO, kREINFORCE, kGMPO, kCLIPCOV, kKLCOV };
enum KLType : int { kK1 = 0, kAbs, kK2, kK3 };
enum Rollout : int { kRollNone = 0, kTokTrunc, kTokMask, kSeqTrunc, kSeqMask };

constexpr int kRowCols = 8;

struct Cfg {
  int64_t B, T;
  int kl_type;
  bool kl_on, kl_straight, kl_clamp, kl_rho, ent_on, dH_on;
  int rollout;
  float el, eh, dual_c, delta, cis_lo, cis_hi, tau_pos, tau_neg;
  float kl_coef, ent_coef, r_min, r_max, offpol_thr, cov_kl;
};

static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }


// One row's inputs (absent optional inputs point at a row of neutral values).
struct Row {
  const float *lp, *old, *adv, *ref, *ent, *roll, *keep;
  const uint8_t *mask, *sel;
  float *out, *dlp, *dH;
};

// Flags (compile time, so the token loop has no branches and vectorises).
enum Flag : int { kFlagKL = 1, kFlagDH = 2, kFlagTokRoll = 4 };

template <int LT, int FL>
__attribute__((always_inline)) inline void row_body(const Cfg& c, const Row& R) {
  constexpr bool KL = (FL & kFlagKL) != 0, DH = (FL & kFlagDH) != 0, TOKROLL = (FL & kFlagTokRoll) != 0;
  const int64_t T = c.T;
  const float* __restrict lp = R.lp;
  const float* __restrict old = R.old;
  const float* __restrict adv = R.adv;
  const float* __restrict ref = R.ref;
  const float* __restrict ent = R.ent;
  const float* __restrict roll = R.roll;
  const float* __restrict keep = R.keep;
  const uint8_t* __restrict mask = R.mask;
  const uint8_t* __restrict sel = R.sel;
  // configuration in locals: the stores below cannot alias it
  const float el = c.el, eh = c.eh, dual_c = c.dual_c, delta = c.delta, cis_lo = c.cis_lo, cis_hi = c.cis_hi;
  const float tau_pos = c.tau_pos, tau_neg = c.tau_neg, kl_coef = c.kl_coef, ent_coef = c.ent_coef;
  const float r_min = c.r_min, r_max = c.r_max, cov_kl = c.cov_kl;
  const int rollout = c.rollout;
  const bool kl_clamp = c.kl_clamp;
  const float w_k1 = c.kl_type == kK1, w_abs = c.kl_type == kAbs, w_k2 = c.kl_type == kK2, w_k3 = c.kl_type == kK3;
  const float w_st = c.kl_straight ? 1.f : 0.f, w_rho = c.kl_rho ? 1.f : 0.f;
  const bool tok_roll = c.rollout == kTokTrunc || c.rollout == kTokMask;
  const bool roll_trunc = c.rollout == kTokTrunc || c.rollout == kSeqTrunc;
  const bool seq_roll = c.rollout == kSeqTrunc || c.rollout == kSeqMask;

  // ---- pass 1: per-row sums (only what the configuration needs) ----
  float n1 = 0.f, sl = 0.f, slr = 0.f, sc = 0.f, sa = 0.f, sw = 0.f;
  const bool need1 = LT == kGSPO || LT == kGMPO || seq_roll || std::isfinite(c.offpol_thr);
  if (need1) {
#pragma omp simd reduction(+ : n1, sl, slr, sc, sa, sw)
    for (int64_t t = 0; t < T; ++t) {
      const bool v = mask[t] != 0;
      const float l = lp[t] - old[t];
      const float a = adv[t];
      const float lr = old[t] - roll[t];
      const float r = exp_f32(clampf(lr, -20.f, 20.f));
      float wt = roll_trunc ? (r > c.r_max ? c.r_max : r) : ((r >= c.r_min && r <= c.r_max) ? r : 0.f);
      wt = (tok_roll ? wt : 1.f) * keep[t];
      const float ct = a > 0.f ? (l > c.eh ? c.eh : l) : (a < 0.f ? (l < -c.el ? -c.el : l) : 0.f);
      n1 += v ? 1.f : 0.f;
      sl += v ? l : 0.f;
      slr += v ? lr : 0.f;
      sc += v ? ct : 0.f;
      sa += v ? a : 0.f;
      sw += v ? wt : 0.f;
    }
  }
  const float inv_n = 1.f / (n1 > 1.f ? n1 : 1.f);
  float w_row = 1.f;
  if (seq_roll) {
    const float R = std::exp(clampf(slr, -20.f, 20.f));
    w_row = roll_trunc ? (R > c.r_max ? c.r_max : R) : ((R >= c.r_min && R <= c.r_max) ? R : 0.f);
  }
  if (std::isfinite(c.offpol_thr) && sa * inv_n < 0.f && -sl * inv_n > c.offpol_thr) w_row = 0.f;
  const float gspo_rho = LT == kGSPO ? std::exp(std::fmin(sl * inv_n, 10.f)) : 0.f;
  float gmpo_G = 0.f, gmpo_row = 0.f;
  if (LT == kGMPO && n1 > 0.f) {
    const float seq = -std::exp(sc * inv_n) * (sa * inv_n);
    gmpo_row = w_row * sw * seq;
    gmpo_G = gmpo_row * inv_n;  // times dc_t
  }

  // ---- pass 2: per-token loss, gradients and metric sums ----
  const float lo = 1.f - c.el, hi = 1.f + c.eh;
  // Options off become bounds that never bind (no runtime branches in the loop, so it vectorises).
  constexpr float kBig = std::numeric_limits<float>::max();
  const float delta_b = (LT == kPPO && c.delta > 0.f) ? c.delta : kBig;
  const float dual_b = (LT == kPPO && c.dual_c > 0.f) ? c.dual_c : kBig;
  const float xlo = kl_clamp ? -20.f : -kBig, xhi = kl_clamp ? 20.f : kBig;
  const float klo = kl_clamp ? -10.f : -kBig, khi = kl_clamp ? 10.f : kBig;
  const float w_trunc = rollout == kTokTrunc ? 1.f : 0.f;
  float t_loss = 0.f, t_n = 0.f, t_clip = 0.f, t_low = 0.f, t_negl = 0.f, t_kl = 0.f, t_H = 0.f, t_sel = 0.f;
  float* __restrict dlp = R.dlp;
  float* __restrict dH = R.dH;
  // The uint8 mask and selection are widened to fp32 one chunk at a time, so the token loop
  // below works on fp32 only (a uint8 operand makes the vectoriser pick 16+ lanes and spill).
  constexpr int64_t kChunk = 512;
  alignas(64) float vb[kChunk];
  alignas(64) float sb[kChunk];
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
  const int64_t n = T - t0 < kChunk ? T - t0 : kChunk;
  for (int64_t t = 0; t < n; ++t) {
    vb[t] = mask[t0 + t] != 0 ? 1.f : 0.f;
    sb[t] = sel[t0 + t] != 0 ? 1.f : 0.f;
  }
  const float* __restrict c_lp = lp + t0;
  const float* __restrict c_old = old + t0;
  const float* __restrict c_adv = adv + t0;
  const float* __restrict c_ref = ref + t0;
  const float* __restrict c_ent = ent + t0;
  const float* __restrict c_roll = roll + t0;
  const float* __restrict c_keep = keep + t0;
  float* __restrict c_dlp = dlp + t0;
  float* __restrict c_dH = DH ? dH + t0 : nullptr;
  float s_loss = 0.f, s_n = 0.f, s_clip = 0.f, s_low = 0.f, s_negl = 0.f, s_kl = 0.f, s_H = 0.f, s_sel = 0.f;
#pragma omp simd reduction(+ : s_loss, s_n, s_clip, s_low, s_negl, s_kl, s_H, s_sel)
  for (int64_t t = 0; t < n; ++t) {
    const bool v = vb[t] != 0.f;
    const float x_lp = c_lp[t], a = c_adv[t];
    const float l = x_lp - c_old[t];
    const float rho_c = exp_f32(clampf(l, -20.f, 20.f));
    const float drho_c = (l >= -20.f & l <= 20.f) ? rho_c : 0.f;
    const bool picked = sb[t] != 0.f;
    float pg = 0.f, dpg = 0.f, clip = 0.f, low = 0.f;
    if (LT == kPPO | LT == kGSPO | LT == kCLIPCOV) {
      float rho = rho_c, drho = drho_c;
      if (LT == kGSPO) { rho = gspo_rho; drho = gspo_rho; }
      if (LT == kCLIPCOV) { rho = exp_f32(l); drho = rho; }
      float r1 = rho, dr1 = drho;
      if (LT == kPPO) {
        r1 = rho > delta_b ? delta_b : rho;
        dr1 = rho > delta_b ? 0.f : drho;
      }
      const float L1 = -a * r1;
      const float L2 = -a * clampf(rho, lo, hi);
      const float dL2 = (rho >= lo & rho <= hi) ? -a * drho : 0.f;
      const bool is_clip = L2 > L1;
      pg = is_clip ? L2 : L1;
      dpg = is_clip ? dL2 : -a * dr1;
      clip = is_clip ? 1.f : 0.f;
      if (LT == kPPO) {
        const float L3 = -dual_b * a;
        const bool is_low = a < 0.f & pg > L3;
        pg = is_low ? L3 : pg;
        dpg = is_low ? 0.f : dpg;
        low = is_low ? 1.f : 0.f;
      }
      if (LT == kCLIPCOV) {
        pg = picked ? 0.f : pg;
        dpg = picked ? 0.f : dpg;
      }
    } else if (LT == kKLCOV) {
      const float rho = exp_f32(l);
      pg = -a * rho + (picked ? cov_kl * std::fabs(l) : 0.f);
      dpg = -a * rho + (picked ? cov_kl * (l > 0.f ? 1.f : (l < 0.f ? -1.f : 0.f)) : 0.f);
    } else if (LT == kCISPO) {
      const float w = clampf(rho_c, cis_lo, cis_hi);
      pg = -w * a * x_lp;
      dpg = -w * a;
      clip = (rho_c < cis_lo | rho_c > cis_hi) ? 1.f : 0.f;
    } else if (LT == kSAPO) {
      const float tau = a > 0.f ? tau_pos : tau_neg;
      const float s = 1.f / (1.f + exp_f32(-tau * (rho_c - 1.f)));
      pg = -(4.f / tau) * s * a;
      dpg = -4.f * s * (1.f - s) * a * drho_c;
    } else if (LT == kREINFORCE) {
      pg = -a * x_lp;
      dpg = -a;
    } else if (LT == kGMPO) {
      const float dc = a > 0.f ? (l <= eh ? 1.f : 0.f) : (a < 0.f ? (l >= -el ? 1.f : 0.f) : 0.f);
      dpg = gmpo_G * dc;
      clip = (l < -el | l > eh) ? 1.f : 0.f;
    }
    // detached weights
    float w = c_keep[t] * w_row;
    if (TOKROLL) {
      const float r = exp_f32(clampf(c_old[t] - c_roll[t], -20.f, 20.f));
      const float w_t = r > r_max ? r_max : r;
      const float w_m = (r >= r_min & r <= r_max) ? r : 0.f;
      w *= w_trunc * w_t + (1.f - w_trunc) * w_m;
    }
    float L = LT == kGMPO ? 0.f : w * pg;
    float g = LT == kGMPO ? dpg : w * dpg;
    // KL term (x = ref - lp)
    float klv = 0.f;
    if (KL) {
      const float d = x_lp - c_ref[t];
      const float x = -d;
      const float xc = clampf(x, xlo, xhi);
      const float e = exp_f32(xc);
      const float k3 = e - xc - 1.f;
      const float k3c = clampf(k3, klo, khi);
      const bool k3_live = x >= xlo & x <= xhi & k3 >= klo & k3 <= khi;
      const float dk3 = k3_live ? -(e - 1.f) : 0.f;
      const float sgn = d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f);
      // blends with 0/1 weights (a ternary chain on kl_type would become a switch and stop SIMD)
      klv = w_k1 * d + w_abs * std::fabs(d) + w_k2 * (0.5f * d * d) + w_k3 * k3c;
      const float dkl_own = w_k1 + w_abs * sgn + w_k2 * d + w_k3 * dk3;
      const float dkl = w_st * d + (1.f - w_st) * dkl_own;
      const float kr = 1.f + w_rho * (rho_c - 1.f);
      L += kl_coef * kr * klv;
      g += kl_coef * kr * dkl;
    }
    const float h = c_ent[t];  // a row of zeros when no entropy is given
    L -= ent_coef * h;
    c_dlp[t] = v ? g : 0.f;
    if (DH) c_dH[t] = v ? -ent_coef : 0.f;
    s_loss += v ? L : 0.f;
    s_n += v ? 1.f : 0.f;
    s_clip += v ? clip : 0.f;
    s_low += v ? low : 0.f;
    s_negl += v ? -l : 0.f;
    s_kl += v ? klv : 0.f;
    s_H += v ? h : 0.f;
    s_sel += v ? sb[t] : 0.f;
  }
  t_loss += s_loss; t_n += s_n; t_clip += s_clip; t_low += s_low;
  t_negl += s_negl; t_kl += s_kl; t_H += s_H; t_sel += s_sel;
  }
  float* row = R.out;
  row[0] = t_loss + gmpo_row;
  row[1] = t_n;
  row[2] = t_clip;
  row[3] = t_low;
  row[4] = t_negl;
  row[5] = t_kl;
  row[6] = t_H;
  row[7] = t_sel;
}

// The same body compiled for AVX-512 (32 vector registers: the token loop's live values fit
// without spilling), AVX2+FMA and the baseline, picked at run time. (target_clones left some
// instantiations scalar; explicit targets keep them vectorised.)
template <int LT, int FL>
__attribute__((target("arch=x86-64-v4"))) void row_kernel_avx512(const Cfg& c, const Row& R) { row_body<LT, FL>(c, R); }

template <int LT, int FL>
__attribute__((target("arch=x86-64-v3"))) void row_kernel_avx2(const Cfg& c, const Row& R) { row_body<LT, FL>(c, R); }

template <int LT, int FL>
void row_kernel_base(const Cfg& c, const Row& R) { row_body<LT, FL>(c, R); }

// 2: AVX-512 (F, VL, BW, DQ), 1: AVX2 + FMA, 0: baseline
inline int cpu_level() {
  static const int level = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
                               ? 2
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
  return level;
}

template <int LT, int FL>
void row_kernel(const Cfg& c, const Row& R) {
  switch (cpu_level()) {
    case 2: row_kernel_avx512<LT, FL>(c, R); break;
    case 1: row_kernel_avx2<LT, FL>(c, R); break;
    default: row_kernel_base<LT, FL>(c, R);
  }
}

template <typename P>
P* as(uintptr_t p) { return reinterpret_cast<P*>(p); }

void policy_loss_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t ref,
                     uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t sel, uintptr_t row, uintptr_t dlp,
                     uintptr_t dH, int loss_type, int kl_type, bool kl_straight, bool kl_clamp, bool kl_rho,
                     int rollout, const std::vector<double>& f) {
  if (f.size() != 14) throw std::invalid_argument("policy_loss_fwd_cpu: expected 14 float parameters");
  Cfg c{B, T, kl_type, ref != 0, kl_straight, kl_clamp, kl_rho, ent != 0, dH != 0, rollout,
        float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[4]), float(f[5]), float(f[6]), float(f[7]),
        float(f[8]), float(f[9]), float(f[10]), float(f[11]), float(f[12]), float(f[13])};
  // Absent optional inputs read from one shared row of neutral values (keeps the loops branch-free).
  std::vector<float> zeros(static_cast<size_t>(T), 0.f), ones(static_cast<size_t>(T), 1.f);
  std::vector<uint8_t> no_sel(static_cast<size_t>(T), 0);
  if (B == 0) return;
  const float* f_lp = as<const float>(lp);
  const float* f_old = as<const float>(old);
  const float* f_adv = as<const float>(adv);
  const uint8_t* u_mask = as<const uint8_t>(mask);
  const int flags = (ref ? kFlagKL : 0) | (dH ? kFlagDH : 0) |
                    ((rollout == kTokTrunc || rollout == kTokMask) ? kFlagTokRoll : 0);
  auto launch = [&](auto tag) {
    constexpr int LT = decltype(tag)::value;
    void (*fn)(const Cfg&, const Row&) = nullptr;
    switch (flags) {
      case 0: fn = row_kernel<LT, 0>; break;
      case 1: fn = row_kernel<LT, 1>; break;
      case 2: fn = row_kernel<LT, 2>; break;
      case 3: fn = row_kernel<LT, 3>; break;
      case 4: fn = row_kernel<LT, 4>; break;
      case 5: fn = row_kernel<LT, 5>; break;
      case 6: fn = row_kernel<LT, 6>; break;
      default: fn = row_kernel<LT, 7>; break;
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < B; ++i) {
      const int64_t o = i * T;
      Row r{f_lp + o, f_old + o, f_adv + o,
            ref ? as<const float>(ref) + o : zeros.data(),
            ent ? as<const float>(ent) + o : zeros.data(),
            roll ? as<const float>(roll) + o : f_old + o,
            keep ? as<const float>(keep) + o : ones.data(),
            u_mask + o, sel ? as<const uint8_t>(sel) + o : no_sel.data(),
            as<float>(row) + i * kRowCols, as<float>(dlp) + o, dH ? as<float>(dH) + o : nullptr};
      fn(c, r);
    }
  };
  switch (loss_type) {
    case kPPO: launch(std::integral_constant<int, kPPO>{}); break;
    case kGSPO: launch(std::integral_constant<int, kGSPO>{}); break;
    case kCISPO: launch(std::integral_constant<int, kCISPO>{}); break;
    case kSAPO: launch(std::integral_constant<int, kSAPO>{}); break;
    case kREINFORCE: launch(std::integral_constant<int, kREINFORCE>{}); break;
    case kGMPO: launch(std::integral_constant<int, kGMPO>{}); break;
    case kCLIPCOV: launch(std::integral_constant<int, kCLIPCOV>{}); break;
    case kKLCOV: launch(std::integral_constant<int, kKLCOV>{}); break;
    default: throw std::invalid_argument("policy_loss_fwd_cpu: unknown loss type code");
  }
}

// Backward: gl[i, t] = dlp[i, t] g_i and ge[i, t] = -ent_coef m[i, t] g_i (g_i = grow[i * gstride]),
// one pass over the rows; either output may be absent (0).
template <bool GL, bool GE>
__attribute__((always_inline)) inline void grads_row(int64_t T, const float* __restrict dlp,
                                                     const uint8_t* __restrict mask, float g, float ge_v,
                                                     float* __restrict gl, float* __restrict ge) {
  if (GL) {
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) gl[t] = dlp[t] * g;
  }
  if (GE) {
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) ge[t] = mask[t] != 0 ? ge_v : 0.f;
  }
}

template <bool GL, bool GE>
__attribute__((target("arch=x86-64-v4"))) void grads_rows_avx512(int64_t B, int64_t T, const float* dlp,
    const float* grow, int64_t gstride, const uint8_t* mask, float ent_coef, float* gl, float* ge) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const float g = grow[i * gstride];
    grads_row<GL, GE>(T, dlp + i * T, mask + i * T, g, -ent_coef * g, gl + (GL ? i * T : 0), ge + (GE ? i * T : 0));
  }
}

template <bool GL, bool GE>
void grads_rows_base(int64_t B, int64_t T, const float* dlp, const float* grow, int64_t gstride, const uint8_t* mask,
                     float ent_coef, float* gl, float* ge) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const float g = grow[i * gstride];
    grads_row<GL, GE>(T, dlp + i * T, mask + i * T, g, -ent_coef * g, gl + (GL ? i * T : 0), ge + (GE ? i * T : 0));
  }
}

void policy_loss_bwd(int64_t B, int64_t T, uintptr_t dlp, uintptr_t grow, int64_t gstride, uintptr_t mask,
                     double ent_coef, uintptr_t gl, uintptr_t ge) {
  if (B == 0 || (!gl && !ge)) return;
  auto run = [&](auto fa, auto fb, auto fc) {
    auto* f = cpu_level() == 2 ? fa : (cpu_level() == 1 ? fb : fc);
    f(B, T, as<const float>(dlp), as<const float>(grow), gstride, as<const uint8_t>(mask), float(ent_coef),
      as<float>(gl), as<float>(ge));
  };
  if (gl && ge) run(grads_rows_avx512<true, true>, grads_rows_base<true, true>, grads_rows_base<true, true>);
  else if (gl) run(grads_rows_avx512<true, false>, grads_rows_base<true, false>, grads_rows_base<true, false>);
  else run(grads_rows_avx512<false, true>, grads_rows_base<false, true>, grads_rows_base<false, true>);
}

}  // namespace

FASTALIGN_BINDINGS(policy_loss) {
  namespace py = pybind11;
  m.def("policy_loss_fwd_cpu", &policy_loss_fwd, py::call_guard<py::gil_scoped_release>(),
        "Fused per-token policy loss over [B, T] fp32 rows (uint8 mask/selection): per-row sums "
        "[B, 8], d(row loss)/d(lp) and d/d(H). Optional inputs/outputs are 0 pointers.");
  m.def("policy_loss_bwd_cpu", &policy_loss_bwd, py::call_guard<py::gil_scoped_release>(),
        "Backward of the row losses: d lp = dlp * g_row, d H = -ent_coef * mask * g_row (either output "
        "may be 0).");
}

}  // namespace fastalign
