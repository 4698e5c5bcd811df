"""``fastalign::elementwise_divergence``: divergences between given distributions, element by element.

Rows ``[n, V]`` of an input x and a target y (log-probabilities or probabilities, no softmax): per row the sum of
the terms f(x_j, y_j), or every term, and the backward ``g df/dx_j`` (the partial derivative in x_j alone; g per
row or per element); the target is a constant. The table of terms: docs/math.md#elementwise-divergence, the
kernels ``csrc/cpu/elementwise_divergence.cpp`` and ``fastalign/kernels/elementwise_divergence.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend
from fastalign._backend import backend_for
from fastalign.ops._launch import (DTYPE_CODE, check_row_pair, check_rows, eager_autograd, kernel_op, ptr,
                                   runs_directly, save_for_backward, triton_kernels)

#: the kernels' modes, by name (the jsd's is chosen by beta: 0 the forward KL, 1 the reverse KL)
MODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "kl": 3, "kl_log_target": 4, "tvd": 5}


def mode_of(divergence: str, beta: float, log_target: bool) -> int:
    """The kernels' mode for a public ``divergence`` (``"jsd"``, ``"kl"`` or ``"tvd"``)."""
    if divergence == "jsd":
        return MODES["forward_kl"] if beta == 0 else MODES["reverse_kl"] if beta == 1 else MODES["jsd"]
    if divergence == "kl":
        return MODES["kl_log_target"] if log_target else MODES["kl"]
    return MODES["tvd"]


def _check(x: Tensor, y: Tensor, mask: Optional[Tensor], mode: int) -> None:
    """The kernels read ``x`` and ``y`` as ``[n, V]`` rows of one kernel dtype with contiguous last dims, and the
    mask as ``n`` fp32 values, by pointer: a TypeError / ValueError naming the argument otherwise. Metadata only."""
    check_row_pair(x, y, ("x", "y"))
    if mask is not None:
        check_rows("mask", mask, x.shape[0], torch.float32)
    if mode not in MODES.values():
        raise ValueError(f"mode must be one of {sorted(MODES.values())}, got {mode}")


def _write(x: Tensor, y: Tensor, mask: Optional[Tensor], mode: int, beta: float, eps: float, backend: str,
           sums: Optional[Tensor] = None, elements: Optional[Tensor] = None, g: Optional[Tensor] = None,
           grad: Optional[Tensor] = None) -> None:
    """One kernel call: forward into ``sums`` ([n]) or ``elements`` ([n, V]), or with ``g`` ([n] or [n, V] fp32,
    contiguous rows) the gradient into ``grad`` (x's shape and dtype)."""
    n, V = x.shape
    if n == 0 or V == 0:
        return
    backend = backend_for("elementwise_divergence", x.device, backend)
    g_elements = g is not None and g.dim() == 2
    b = beta if mode == MODES["jsd"] else 0.5  # the kernels read log beta and log(1 - beta), the JSD's
    coefs = (math.log(b), math.log(1 - b), eps)
    if backend == "triton":
        triton_kernels("elementwise_divergence").elementwise_divergence(x, y, mode, *coefs, mask, sums, elements, g,
                                                                        grad)
        return
    _backend.compiled().elementwise_divergence_cpu(
        x.data_ptr(), y.data_ptr(), DTYPE_CODE[x.dtype], n, V, x.stride(0), y.stride(0), mode, *coefs, ptr(mask),
        ptr(sums), ptr(elements), elements.stride(0) if elements is not None else 0,
        0 if g_elements else ptr(g), ptr(g) if g_elements else 0, g.stride(0) if g_elements else 0,
        ptr(grad), grad.stride(0) if grad is not None else 0)


def _outputs(x: Tensor, y: Tensor, mask: Optional[Tensor], mode: int, elements: bool):
    """The per-row sums ``[n]`` or the terms ``[n, V]``, fp32; the inputs checked as the kernels read them."""
    _check(x, y, mask, mode)
    return torch.empty(x.shape if elements else x.shape[:1], device=x.device, dtype=torch.float32)


@kernel_op("elementwise_divergence", _outputs)
def elementwise_divergence(
    x: Tensor, y: Tensor, mask: Optional[Tensor], mode: int, beta: float, eps: float, elements: bool, backend: str,
    out: Tensor,
) -> None:
    """The sum of each row's terms (``elements``: every term), fp32; differentiable in ``x``. ``mask``: None or
    [n] fp32 (0: the row gives 0, unread)."""
    if elements:
        _write(x, y, mask, mode, beta, eps, backend, elements=out)
    else:
        _write(x, y, mask, mode, beta, eps, backend, sums=out)


def _grad_outputs(x: Tensor):
    return torch.empty_like(x)


@kernel_op("elementwise_divergence_backward", _grad_outputs)
def elementwise_divergence_backward(
    grad: Tensor, x: Tensor, y: Tensor, mask: Optional[Tensor], mode: int, beta: float, eps: float, backend: str,
    out: Tensor,
) -> None:
    """``grad * df/dx`` in x's dtype; ``grad`` the gradient of the sums ([n]) or of the terms ([n, V])."""
    g = grad.float()
    g = g.contiguous() if g.dim() == 1 or (g.shape[1] > 1 and g.stride(1) != 1) else g
    _write(x, y, mask, mode, beta, eps, backend, g=g, grad=out)


def _setup_context(ctx, inputs, output):
    x, y, mask, mode, beta, eps, _elements, backend = inputs
    save_for_backward(ctx, x, y, mask)
    ctx.options = (mode, beta, eps, backend)


def _backward(ctx, grad, direct: bool = False):
    x, y, mask = ctx.saved_tensors
    op = elementwise_divergence_backward.direct if direct else elementwise_divergence_backward
    return op(grad, x, y, mask, *ctx.options), None, None, None, None, None, None, None


elementwise_divergence.register_autograd(_backward, setup_context=_setup_context)


_Eager = eager_autograd(elementwise_divergence, _setup_context, _backward, "element-wise divergence")


def elementwise_divergence_call(x: Tensor, y: Tensor, mask: Optional[Tensor], mode: int, beta: float, eps: float,
                                elements: bool, backend: str) -> Tensor:
    """``elementwise_divergence``: the custom op under tracing or off the C++ path, the autograd function over the
    same kernel where :func:`~fastalign.ops._launch.runs_directly` allows. Same results."""
    args = (x, y, mask, int(mode), float(beta), float(eps), bool(elements), backend)
    if runs_directly(backend, x, y, mask):
        if torch.is_grad_enabled() and x.requires_grad:
            return _Eager.apply(*args)
        return elementwise_divergence.direct(*args)
    return elementwise_divergence(*args)
