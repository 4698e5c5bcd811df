// Python bindings of the CUDA entry points (csrc/cuda/entry_points.h). This file is compiled by
// the C++ compiler of the CPU core, not by nvcc: the arguments are checked here, the GIL is
// released around each launch, and a launch error comes back as RuntimeError
// "fastalign <entry point>: <CUDA message>".
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/advantage_math.h"
#include "cuda/entry_points.h"
#include "registry.h"

namespace fastalign {
namespace {

void raise_if(const char* error, const char* entry_point) {
  if (error) throw std::runtime_error(std::string("fastalign ") + entry_point + ": " + error);
}

void check_dtype(int dtype) {  // the codes fastalign/ops/token_stats.py passes
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("fastalign: unsupported dtype code");
}

void check_group_size(const char* op, uintptr_t perm, int64_t group_size) {
  if (!perm && group_size <= 0) throw std::invalid_argument(std::string(op) + ": group_size must be > 0");
}

}  // namespace

FASTALIGN_BINDINGS(cuda_kernels) {
  namespace py = pybind11;
  using Release = py::call_guard<py::gil_scoped_release>;

  m.def(
      "token_stats_fwd_cuda",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
         uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t lp, uintptr_t ent, uintptr_t sp2,
         uintptr_t amax, uintptr_t lse, uintptr_t stream) {
        check_dtype(dtype);
        raise_if(fastalign_token_stats_fwd_cuda(logits, dtype, N, V, inner, s_outer, s_inner, labels, inv_t,
                                                ignore_index, lp, ent, sp2, amax, lse, stream),
                 "token_stats_fwd_cuda");
      },
      Release());
  m.def(
      "token_stats_bwd_cuda",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, int64_t inner, int64_t s_outer, int64_t s_inner,
         uintptr_t labels, double inv_t, int64_t ignore_index, uintptr_t lse, uintptr_t ent, uintptr_t sp2,
         uintptr_t g_lp, uintptr_t g_h, uintptr_t g_q, uintptr_t grad, int64_t g_outer, int64_t g_inner,
         uintptr_t stream) {
        check_dtype(dtype);
        raise_if(fastalign_token_stats_bwd_cuda(logits, dtype, N, V, inner, s_outer, s_inner, labels, inv_t,
                                                ignore_index, lse, ent, sp2, g_lp, g_h, g_q, grad, g_outer, g_inner,
                                                stream),
                 "token_stats_bwd_cuda");
      },
      Release());

  m.def(
      "reverse_scan_cuda",
      [](uintptr_t x, uintptr_t v, uintptr_t mask, bool f64, int64_t B, int64_t T, double gamma, double lam, int mode,
         uintptr_t out, uintptr_t out2, uintptr_t stream) {
        adv::check_scan_args(mode, v, out2);
        raise_if(fastalign_reverse_scan_cuda(x, v, mask, f64, B, T, gamma, lam, mode, out, out2, stream),
                 "reverse_scan_cuda");
      },
      Release(), "Reverse scan over contiguous [B, T] rows, one block per row, parallel across time.");

  m.def(
      "group_stats_cuda",
      [](uintptr_t scores, bool f64, int64_t B, uintptr_t perm, uintptr_t seg, int64_t group_size, uintptr_t lengths,
         uintptr_t gid, uintptr_t stats, int64_t rows, uintptr_t ngroups, uintptr_t start, uintptr_t stream) {
        check_group_size("group_stats", perm, group_size);
        raise_if(fastalign_group_stats_cuda(scores, f64, B, perm, seg, group_size, lengths, gid, stats, rows, ngroups,
                                            start, stream),
                 "group_stats_cuda");
      },
      Release(),
      "Group ids [B] and statistics [rows, 6] on the device from stably sorted keys (perm, seg) or a fixed "
      "group_size (perm = 0); rows past the number of groups are written as empty groups.");
  m.def(
      "group_advantage_cuda",
      [](uintptr_t scores, bool f64, int64_t B, uintptr_t perm, uintptr_t seg, int64_t group_size, uintptr_t lengths,
         uintptr_t ngroups, uintptr_t start, int mode, bool div_std, double eps, bool singleton_zero,
         uintptr_t scale, uintptr_t out, uintptr_t stream) {
        check_group_size("group_advantage", perm, group_size);
        raise_if(fastalign_group_advantage_cuda(scores, f64, B, perm, seg, group_size, lengths, ngroups, start, mode,
                                                div_std, eps, singleton_zero, scale, out, stream),
                 "group_advantage_cuda");
      },
      Release(),
      "Group-normalised advantage per score, one warp per group (ngroups, start: device scratch for keyed groups).");

  m.def(
      "cov_sums_cuda",
      [](int64_t B, int64_t T, uintptr_t lp, uintptr_t adv, uintptr_t mask, uintptr_t part, uintptr_t out,
         uintptr_t stream) {
        raise_if(fastalign_cov_sums_cuda(B, T, lp, adv, mask, part, out, stream), "cov_sums_cuda");
      },
      Release(), "[sum_v A, sum_v lp, n_valid] of [B, T] rows; part is [B, 3] fp32 scratch.");
  m.def(
      "cov_select_cuda",
      [](int64_t N, uintptr_t lp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t sums, uintptr_t nloc,
         uintptr_t seed, int mode, double ratio, double lb, double ub, double el, double eh, uintptr_t keys,
         uintptr_t hist, uintptr_t state, uintptr_t sel, uintptr_t stream) {
        raise_if(fastalign_cov_select_cuda(N, lp, old, adv, mask, sums, nloc, seed, mode, ratio, lb, ub, el, eh, keys,
                                           hist, state, sel, stream),
                 "cov_select_cuda");
      },
      Release(),
      "Clip-Cov (mode 0) / KL-Cov (mode 1) selection by radix select; keys [N] u64, hist [256] u32 and "
      "state [4] u64 are zeroed scratch.");

  m.def(
      "cuda_runtime_status",
      []() {
        int driver = 0, runtime = 0, devices = 0;
        const char* error = fastalign_cuda_runtime_status(&driver, &runtime, &devices);
        return py::make_tuple(driver, runtime, devices, std::string(error ? error : ""));
      },
      "(driver version, runtime version, devices, error) as the built-in CUDA runtime sees them");
}

}  // namespace fastalign
