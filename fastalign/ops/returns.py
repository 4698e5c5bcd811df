"""``fastalign::reverse_scan``: token-level returns and GAE as reverse scans over
time (docs/math.md#advantages): one sequence per CPU row; on CUDA tensors the CUDA kernels, or, in an
install built without them (or with ``backend="triton"``), the Triton kernel of
``fastalign/kernels/reverse_scan.py``, which scans each row in parallel across time.

Modes (``m`` the 0/1 mask, all rows contiguous ``[B, T]`` in one float dtype):

* ``return``:  ``G_t = x_t m_t + gamma G_{t+1}``, reset to 0 after every masked
  token; out = ``G m`` (reinforce_pp, PRIME implicit rewards).
* ``to_go``:   the same without the reset: ``sum_{s>=t} gamma^{s-t} x_s m_s`` (remax).
* ``gae``:     ``delta_t = x_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``;
  masked tokens carry ``V_next`` and ``A_next`` unchanged; out = ``A m``,
  out2 = ``(A + V) m`` (returns).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastalign import _backend
from fastalign._backend import backend_for
from fastalign.ops._launch import kernel_op, ptr, triton_kernels

SCANS = {"return": 0, "to_go": 1, "gae": 2}


def _outputs(x: Tensor, mode: int):
    return torch.empty_like(x), torch.empty_like(x) if mode == SCANS["gae"] else x.new_empty(0)


@kernel_op("reverse_scan", _outputs)
def reverse_scan(x: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, mode: int, backend: str,
                 out: tuple[Tensor, Tensor]) -> None:
    """(out [B, T], out2 [B, T] for gae else empty); ``values`` empty unless gae."""
    out, out2 = out
    B, T = x.shape
    if B * T == 0:  # no tokens: nothing to scan
        return
    backend = backend_for("reverse_scan", x.device, backend)
    if backend == "triton":
        triton_kernels("reverse_scan").reverse_scan(x, values if values.numel() else None, mask, gamma, lam, mode,
                                                    out, out2 if out2.numel() else None)
        return
    args = (x.data_ptr(), ptr(values), mask.data_ptr(), x.dtype == torch.float64, B, T, float(gamma), float(lam),
            int(mode), out.data_ptr(), ptr(out2))
    if backend == "cuda":
        _backend.compiled().reverse_scan_cuda(*args, _backend.cuda_stream(x))
    else:
        _backend.compiled().reverse_scan_cpu(*args)
