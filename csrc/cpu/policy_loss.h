// The policy-loss CPU kernels' launch interface: option codes, the launch parameters, one row's
// inputs and the entry points. The math is in policy_loss_table.h (the loss rows) and
// policy_loss_rows.h (the fused token loop); docs/math.md#policy-losses has the formulas.
//
// Files: policy_loss_fwd.cpp (the forward over rows), policy_loss_cov.cpp (Clip-Cov / KL-Cov
// with their top-k selection in one call), policy_loss_bwd.cpp (the backward),
// policy_loss_bindings.cpp (the Python entry points).
#pragma once
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kl_estimators.h"  // KLType

namespace fastalign {
namespace policy {

enum LossType : int { kPPO = 0, kGSPO, kCISPO, kSAPO, kREINFORCE, kGMPO, kCLIPCOV, kKLCOV, kVESPO, kDPPOTV, kDPPOKL, kDRO };
enum Rollout : int { kRollNone = 0, kTokTrunc, kTokMask, kSeqTrunc, kSeqMask };
enum KLRho : int { kKLRhoOff = 0, kKLRhoDetached, kKLRhoGrad };

// Per-row outputs: [sum v L, n, #clipped, #dual-clipped, sum v(-l), sum v K, sum v H, selected or phi,
//                   #clip_low, #clip_high, vespo phi of the row]
// Column 7 holds the per-token metric of the loss row: the number of tokens Clip-Cov / KL-Cov picked,
// or vespo's sum v phi_t (phi_t with (k, lambda) by the sign of A_t; column 10 picks by the row's mean A).
constexpr int kRowCols = 11;
constexpr int kPartCols = kRowCols + 1;  // a chunk's sums plus its sequence-level gradient sum

// Tokens per chunk: the uint8 mask and selection are widened to fp32 one chunk at a time, so the
// token loop works on fp32 only (a uint8 operand makes the vectoriser pick 16+ lanes and spill).
constexpr int64_t kChunk = 512;

// The launch parameters, in the order of fastalign.policy_config.KernelParams (the Python side
// checks the names against policy_loss_param_names() once). Codes are carried as exact floats;
// cov_ratio stays a double, so floor(cov_ratio * n) picks as many tokens as the float64 product does.
#define FASTALIGN_POLICY_PARAMS(X)                                                                   \
  X(int, loss_type) X(int, is_level) X(int, kl_type) X(int, kl_straight) X(int, kl_clamp)           \
  X(int, kl_rho) X(int, rollout) X(float, eps_low) X(float, eps_high) X(float, dual_clip)            \
  X(float, delta) X(float, cispo_lo) X(float, cispo_hi) X(float, tau_pos) X(float, tau_neg)          \
  X(float, vespo_k_pos) X(float, vespo_lambda_pos) X(float, vespo_k_neg) X(float, vespo_lambda_neg)  \
  X(float, kl_coef) X(float, entropy_coef) X(float, rollout_min) X(float, rollout_max)               \
  X(float, offpolicy_threshold) X(float, cov_kl_coef) X(double, cov_ratio) X(float, cov_lb)           \
  X(float, cov_ub) X(float, dro_beta) X(float, log_ratio_cap)

struct PolicyParams {
#define FA_FIELD(type, name) type name;
  FASTALIGN_POLICY_PARAMS(FA_FIELD)
#undef FA_FIELD
};

#define FA_COUNT(type, name) +1
constexpr size_t kNumPolicyParams = 0 FASTALIGN_POLICY_PARAMS(FA_COUNT);
#undef FA_COUNT

inline PolicyParams params_from(const std::vector<double>& f, const char* who) {
  if (f.size() != kNumPolicyParams)
    throw std::invalid_argument(std::string(who) + ": expected " + std::to_string(kNumPolicyParams) +
                                " parameters, got " + std::to_string(f.size()));
  PolicyParams p{};
  size_t j = 0;
#define FA_SET(type, name) p.name = static_cast<type>(f[j++]);
  FASTALIGN_POLICY_PARAMS(FA_SET)
#undef FA_SET
  return p;
}

inline std::vector<std::string> policy_param_names() {
  std::vector<std::string> names;
#define FA_NAME(type, name) names.push_back(#name);
  FASTALIGN_POLICY_PARAMS(FA_NAME)
#undef FA_NAME
  return names;
}

// Parameters plus what the launch knows about its inputs.
struct Cfg : PolicyParams {
  int64_t B, T;
  bool iw_on;  // importance weights given (gmpo, vespo: they enter the sequence weight)
};

// Flags (compile time, so the token loop has no branches and vectorises).
// kFlagPlain (Clip-Cov / KL-Cov path only): no keep mask, no entropy, row weight 1, so the token
// loop reads neither neutral row. kFlagSeq: importance_sampling_level = sequence (ppo, cispo, sapo).
// kFlagKLRho: the KL term is multiplied by the ratio (kl_rho detached or with its gradient).
enum Flag : int { kFlagKL = 1, kFlagTokRoll = 2, kFlagPlain = 4, kFlagSeq = 8, kFlagKLRho = 16 };

// One row's inputs (absent optional inputs point at a row of neutral values).
struct Row {
  const float *lp, *old, *adv, *ref, *ent, *roll, *keep, *iw;
  const uint8_t *mask, *sel;
  float *out, *dlp;
};

// Every input row (absent optional inputs point at one row of neutral values).
struct Inputs {
  int64_t T;
  const float *lp, *old, *adv, *ref, *ent, *roll, *keep, *iw;
  const uint8_t *mask, *sel;
  float *row, *dlp;
  const float *zeros, *ones;
  const uint8_t* no_sel;
  Row at(int64_t i) const {
    const int64_t o = i * T;
    return Row{lp + o, old + o, adv + o, ref ? ref + o : zeros, ent ? ent + o : zeros, roll ? roll + o : old + o,
               keep ? keep + o : ones, iw ? iw + o : ones, mask + o, sel ? sel + o : no_sel, row + i * kRowCols,
               dlp ? dlp + o : nullptr};
  }
};

// Absent optional inputs read from one shared row of neutral values (keeps the loops branch-free).
struct NeutralRows {
  std::vector<float> zeros, ones;
  std::vector<uint8_t> no_sel;
  explicit NeutralRows(int64_t T)
      : zeros(static_cast<size_t>(T), 0.f), ones(static_cast<size_t>(T), 1.f), no_sel(static_cast<size_t>(T), 0) {}
};

// The launch configuration from the parameter list and the inputs given.
inline Cfg make_cfg(const std::vector<double>& params, const char* who, int64_t B, int64_t T, bool iw_on) {
  Cfg c{};
  static_cast<PolicyParams&>(c) = params_from(params, who);
  c.B = B;
  c.T = T;
  c.iw_on = iw_on;
  return c;
}

// The per-sequence clip metrics from the row sums, written after them by each forward:
// ext = [min_i #clip_low_i / n_i, max_i #clip_high_i / n_i] over the rows with n_i > 0, NaN when
// there is none (the fp32 quotients of the Python side; NaN propagates).
inline void clip_extremes(int64_t B, const float* row, float* ext) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool any = false;
  for (int64_t i = 0; i < B; ++i) {
    const float* r = row + i * kRowCols;
    if (!(r[1] > 0.f)) continue;
    const float flo = r[8] / r[1], fhi = r[9] / r[1];
    lo = (flo < lo || flo != flo) && lo == lo ? flo : lo;
    hi = (fhi > hi || fhi != fhi) && hi == hi ? fhi : hi;
    any = true;
  }
  ext[0] = any ? lo : std::numeric_limits<float>::quiet_NaN();
  ext[1] = any ? hi : std::numeric_limits<float>::quiet_NaN();
}

// params: fastalign.policy_config.KernelParams. Optional inputs are 0 pointers; ext: fp32 [2]
// (clip_extremes).
void policy_loss_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t ref,
                     uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t iw, uintptr_t sel, uintptr_t row,
                     uintptr_t dlp, uintptr_t ext, const std::vector<double>& params);

// params: fastalign.policy_config.KernelParams (loss_type clip_cov | kl_cov).
// cov: fp32 [sum_v A, sum_v lp, n (for the means), n_local (for k)] or 0 (computed here);
// seed: int64 [1]. dlp may be 0 (forward only: the gradient is not written); ext: fp32 [2] (clip_extremes).
void policy_loss_cov_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask,
                         uintptr_t ref, uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t cov, uintptr_t seed,
                         uintptr_t row, uintptr_t dlp, uintptr_t ext, const std::vector<double>& params);

// gl[i, t] = dlp[i, t] g_i and ge[i, t] = -ent_coef m[i, t] g_i (g_i = grow[i * gstride]); either
// output may be absent (0).
void policy_loss_bwd(int64_t B, int64_t T, uintptr_t dlp, uintptr_t grow, int64_t gstride, uintptr_t mask,
                     double ent_coef, uintptr_t gl, uintptr_t ge);

}  // namespace policy
}  // namespace fastalign
