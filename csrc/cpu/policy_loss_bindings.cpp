// Python entry points of the policy-gradient loss CPU kernels (fastalign/ops/policy_loss.py).
#include <pybind11/stl.h>

#include "cpu/policy_loss.h"
#include "registry.h"

FASTALIGN_BINDINGS(policy_loss) {
  namespace py = pybind11;
  using namespace fastalign::policy;
  m.def("policy_loss_fwd_cpu", &policy_loss_fwd, py::call_guard<py::gil_scoped_release>(),
        "Fused per-token policy loss over [B, T] fp32 rows (uint8 mask/selection): per-row sums "
        "[B, 11], d(row loss)/d(lp) and the per-sequence clip extremes [2]. Optional inputs are 0 pointers; "
        "params in KernelParams order.");
  m.def("policy_loss_param_names", &policy_param_names,
        "Names of the policy-loss launch parameters, in the order the kernels read them.");
  m.def("policy_loss_cov_fwd_cpu", &policy_loss_cov_fwd, py::call_guard<py::gil_scoped_release>(),
        "Clip-Cov / KL-Cov policy loss in one call: covariance sums (or given), loss and gradient with "
        "the selection candidates collected in the same pass, fix-up of the chunks holding picks. "
        "Per-row sums [B, 11], d(row loss)/d(lp) (0 pointer: not written) and the per-sequence clip extremes [2].");
  m.def("policy_loss_bwd_cpu", &policy_loss_bwd, py::call_guard<py::gil_scoped_release>(),
        "Backward of the row losses: d lp = dlp * g_row, d H = -ent_coef * mask * g_row (either output "
        "may be 0).");
}
