// The policy-gradient loss forward on the CPU: the token loop of policy_loss_rows.h over the rows
// (OpenMP), instantiated per loss type and input flags and per instruction set.
#pragma GCC optimize("no-tree-sink")  // keeps the token loop vectorised: see policy_loss_rows.h
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"
#include "cpu/policy_loss.h"
#include "cpu/policy_loss_rows.h"
#include "registry.h"

namespace fastalign {
namespace policy {
namespace {

using RowFn = void (*)(const Cfg&, const Row&);

// The row kernel for the input flags (the sequence-level flag only for the rows that have one).
template <int LT>
RowFn row_kernel(int flags) {
  if constexpr (LT == kPPO || LT == kCISPO || LT == kSAPO) {
    switch (flags) {
      case 8: return isa::best<row_body<LT, 8>>();
      case 9: return isa::best<row_body<LT, 9>>();
      case 10: return isa::best<row_body<LT, 10>>();
      case 11: return isa::best<row_body<LT, 11>>();
      case 25: return isa::best<row_body<LT, 25>>();
      case 27: return isa::best<row_body<LT, 27>>();
      default: break;
    }
  }
  switch (flags & ~kFlagSeq) {
    case 0: return isa::best<row_body<LT, 0>>();
    case 1: return isa::best<row_body<LT, 1>>();
    case 2: return isa::best<row_body<LT, 2>>();
    case 3: return isa::best<row_body<LT, 3>>();
    case 17: return isa::best<row_body<LT, 17>>();
    default: return isa::best<row_body<LT, 19>>();
  }
}

RowFn row_kernel_for(int loss_type, int flags) {
  switch (loss_type) {
    case kPPO: return row_kernel<kPPO>(flags);
    case kGSPO: return row_kernel<kGSPO>(flags);
    case kCISPO: return row_kernel<kCISPO>(flags);
    case kSAPO: return row_kernel<kSAPO>(flags);
    case kREINFORCE: return row_kernel<kREINFORCE>(flags);
    case kGMPO: return row_kernel<kGMPO>(flags);
    case kCLIPCOV: return row_kernel<kCLIPCOV>(flags);
    case kKLCOV: return row_kernel<kKLCOV>(flags);
    case kVESPO: return row_kernel<kVESPO>(flags);
    case kDPPOTV: return row_kernel<kDPPOTV>(flags);
    case kDPPOKL: return row_kernel<kDPPOKL>(flags);
    case kDRO: return row_kernel<kDRO>(flags);
    default: throw std::invalid_argument("policy_loss_fwd_cpu: unknown loss type code");
  }
}

}  // namespace

void policy_loss_fwd(int64_t B, int64_t T, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t ref,
                     uintptr_t ent, uintptr_t roll, uintptr_t keep, uintptr_t iw, uintptr_t sel, uintptr_t row,
                     uintptr_t dlp, uintptr_t ext, const std::vector<double>& params) {
  const Cfg c = make_cfg(params, "policy_loss_fwd_cpu", B, T, iw != 0);
  const int flags = (ref ? kFlagKL : 0) | ((c.rollout == kTokTrunc || c.rollout == kTokMask) ? kFlagTokRoll : 0) |
                    (c.is_level != 0 ? kFlagSeq : 0) | ((ref && c.kl_rho != kKLRhoOff) ? kFlagKLRho : 0);
  if (B == 0) return clip_extremes(0, nullptr, ptr<float>(ext));
  const RowFn fn = row_kernel_for(c.loss_type, flags);
  const NeutralRows neutral(T);
  const Inputs in{T, ptr<const float>(lp), ptr<const float>(old), ptr<const float>(adv), ptr<const float>(ref),
                  ptr<const float>(ent), ptr<const float>(roll), ptr<const float>(keep), ptr<const float>(iw),
                  ptr<const uint8_t>(mask), ptr<const uint8_t>(sel), ptr<float>(row), ptr<float>(dlp),
                  neutral.zeros.data(), neutral.ones.data(), neutral.no_sel.data()};
#pragma omp parallel for schedule(static) num_threads(threads_for(B * T))
  for (int64_t i = 0; i < B; ++i) fn(c, in.at(i));
  clip_extremes(B, in.row, ptr<float>(ext));
}

}  // namespace policy
}  // namespace fastalign
