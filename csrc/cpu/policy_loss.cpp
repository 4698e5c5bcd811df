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

#define FASTALIGN_CPU_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// One row's inputs (absent optional inputs point at a row of neutral values).
struct Row {
  const float *lp, *old, *adv, *ref, *ent, *roll, *keep;
  const uint8_t *mask, *sel;
  float *out, *dlp, *dH;
};

template <int LT>
FASTALIGN_CPU_TARGETS
void row_kernel(const Cfg& c, const Row& R) {
  const int64_t T = c.T;
  const float *lp = R.lp, *old = R.old, *adv = R.adv, *ref = R.ref, *ent = R.ent, *roll = R.roll, *keep = R.keep;
  const uint8_t *mask = R.mask, *sel = R.sel;
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
  const bool dual_on = c.dual_c > 0.f, delta_on = c.delta > 0.f;
  float s_loss = 0.f, s_n = 0.f, s_clip = 0.f, s_low = 0.f, s_negl = 0.f, s_kl = 0.f, s_H = 0.f, s_sel = 0.f;
  float* dlp = R.dlp;
  float* dH = R.dH;
#pragma omp simd reduction(+ : s_loss, s_n, s_clip, s_low, s_negl, s_kl, s_H, s_sel)
  for (int64_t t = 0; t < T; ++t) {
    const bool v = mask[t] != 0;
    const float x_lp = lp[t], a = adv[t];
    const float l = x_lp - old[t];
    const float rho_c = exp_f32(clampf(l, -20.f, 20.f));
    const float drho_c = (l >= -20.f && l <= 20.f) ? rho_c : 0.f;
    const bool picked = sel[t] != 0;
    float pg = 0.f, dpg = 0.f, clip = 0.f, low = 0.f;
    if (LT == kPPO || LT == kGSPO || LT == kCLIPCOV) {
      float rho = rho_c, drho = drho_c;
      if (LT == kGSPO) { rho = gspo_rho; drho = gspo_rho; }
      if (LT == kCLIPCOV) { rho = exp_f32(l); drho = rho; }
      float r1 = rho, dr1 = drho;
      if (LT == kPPO && delta_on) {
        r1 = rho > c.delta ? c.delta : rho;
        dr1 = rho > c.delta ? 0.f : drho;
      }
      const float L1 = -a * r1;
      const float L2 = -a * clampf(rho, lo, hi);
      const float dL2 = (rho >= lo && rho <= hi) ? -a * drho : 0.f;
      const bool is_clip = L2 > L1;
      pg = is_clip ? L2 : L1;
      dpg = is_clip ? dL2 : -a * dr1;
      clip = is_clip ? 1.f : 0.f;
      if (LT == kPPO && dual_on) {
        const float L3 = -c.dual_c * a;
        const bool is_low = a < 0.f && pg > L3;
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
      pg = -a * rho + (picked ? c.cov_kl * std::fabs(l) : 0.f);
      dpg = -a * rho + (picked ? c.cov_kl * (l > 0.f ? 1.f : (l < 0.f ? -1.f : 0.f)) : 0.f);
    } else if (LT == kCISPO) {
      const float w = clampf(rho_c, c.cis_lo, c.cis_hi);
      pg = -w * a * x_lp;
      dpg = -w * a;
      clip = (rho_c < c.cis_lo || rho_c > c.cis_hi) ? 1.f : 0.f;
    } else if (LT == kSAPO) {
      const float tau = a > 0.f ? c.tau_pos : c.tau_neg;
      const float s = 1.f / (1.f + exp_f32(-tau * (rho_c - 1.f)));
      pg = -(4.f / tau) * s * a;
      dpg = -4.f * s * (1.f - s) * a * drho_c;
    } else if (LT == kREINFORCE) {
      pg = -a * x_lp;
      dpg = -a;
    } else if (LT == kGMPO) {
      const float dc = a > 0.f ? (l <= c.eh ? 1.f : 0.f) : (a < 0.f ? (l >= -c.el ? 1.f : 0.f) : 0.f);
      dpg = gmpo_G * dc;
      clip = (l < -c.el || l > c.eh) ? 1.f : 0.f;
    }
    // detached weights
    float w = keep[t] * w_row;
    if (c.rollout == kTokTrunc || c.rollout == kTokMask) {
      const float r = exp_f32(clampf(old[t] - roll[t], -20.f, 20.f));
      w *= c.rollout == kTokTrunc ? (r > c.r_max ? c.r_max : r) : ((r >= c.r_min && r <= c.r_max) ? r : 0.f);
    }
    float L = LT == kGMPO ? 0.f : w * pg;
    float g = LT == kGMPO ? dpg : w * dpg;
    // KL term (x = ref - lp)
    float klv = 0.f;
    if (c.kl_on) {
      const float d = x_lp - ref[t];
      const float x = -d;
      const float xc = c.kl_clamp ? clampf(x, -20.f, 20.f) : x;
      const float e = exp_f32(xc);
      const float k3 = e - xc - 1.f;
      const float k3c = c.kl_clamp ? clampf(k3, -10.f, 10.f) : k3;
      const bool k3_live = !c.kl_clamp || (x >= -20.f && x <= 20.f && k3 >= -10.f && k3 <= 10.f);
      const float dk3 = k3_live ? -(e - 1.f) : 0.f;
      const float sgn = d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f);
      klv = c.kl_type == kK1 ? d : (c.kl_type == kAbs ? std::fabs(d) : (c.kl_type == kK2 ? 0.5f * d * d : k3c));
      float dkl = c.kl_straight ? d : (c.kl_type == kK1 ? 1.f : (c.kl_type == kAbs ? sgn : (c.kl_type == kK2 ? d : dk3)));
      const float kr = c.kl_rho ? rho_c : 1.f;
      L += c.kl_coef * kr * klv;
      g += c.kl_coef * kr * dkl;
    }
    float h = 0.f;
    if (c.ent_on) {
      h = ent[t];
      L -= c.ent_coef * h;
    }
    dlp[t] = v ? g : 0.f;
    if (dH) dH[t] = v ? -c.ent_coef : 0.f;
    s_loss += v ? L : 0.f;
    s_n += v ? 1.f : 0.f;
    s_clip += v ? clip : 0.f;
    s_low += v ? low : 0.f;
    s_negl += v ? -l : 0.f;
    s_kl += v ? klv : 0.f;
    s_H += v ? h : 0.f;
    s_sel += (v && picked) ? 1.f : 0.f;
  }
  float* row = R.out;
  row[0] = s_loss + gmpo_row;
  row[1] = s_n;
  row[2] = s_clip;
  row[3] = s_low;
  row[4] = s_negl;
  row[5] = s_kl;
  row[6] = s_H;
  row[7] = s_sel;
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
  auto launch = [&](auto tag) {
    constexpr int LT = decltype(tag)::value;
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
      row_kernel<LT>(c, r);
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

}  // namespace

FASTALIGN_BINDINGS(policy_loss) {
  namespace py = pybind11;
  m.def("policy_loss_fwd_cpu", &policy_loss_fwd, py::call_guard<py::gil_scoped_release>(),
        "Fused per-token policy loss over [B, T] fp32 rows (uint8 mask/selection): per-row sums "
        "[B, 8], d(row loss)/d(lp) and d/d(H). Optional inputs/outputs are 0 pointers.");
}

}  // namespace fastalign
