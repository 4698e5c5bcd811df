"""``fastalign::token_stats``: log-prob / entropy / sum p^2 / argmax per logits row.

Forward and backward are custom ops (``kernel_op``: outputs declared once, fakes from them), so autograd,
``torch.compile(fullgraph=True)`` and CUDA graphs see one opaque node each.
Logits come in as a ``[outer, inner, V]`` view (last dim contiguous, any
leading strides), labels as a contiguous int64 ``[outer * inner]``.
Statistics that were not requested are returned as empty tensors and cost
nothing; gradients that are None cost nothing in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend
from fastalign._backend import backend_for
from fastalign.ops._launch import (DTYPE_CODE, check_rows, eager_autograd, kernel_op, on_device, opt, ptr,
                                   runs_directly, save_for_backward, stat_outputs, triton_kernels)


def shares_memory(t: Tensor) -> bool:
    """True unless the elements of ``t`` provably occupy distinct memory: with the dims of size > 1
    sorted by stride, each stride must reach past everything the smaller ones span (an expanded
    dim has stride 0 and fails; slices and permutations of a dense tensor pass)."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def check_inplace_backward(logits: Tensor) -> None:
    """``inplace_backward`` writes d(logits) over the logits: refuse logits whose elements share
    memory (an ``expand`` or overlapping ``as_strided`` view), where that would corrupt the gradient."""
    if logits.numel() and shares_memory(logits):
        raise ValueError(
            "inplace_backward=True needs logits whose elements do not share memory, got a view with shape "
            f"{tuple(logits.shape)} and strides {tuple(logits.stride())} (expanded or overlapping); pass "
            "inplace_backward=False or logits.contiguous()")


def check_inputs(logits: Tensor, labels: Tensor) -> None:
    """The kernels read ``[outer, inner, V]`` logits of a kernel dtype (fp32, bf16, fp16) whose rows are
    contiguous, and ``labels`` as ``outer * inner`` contiguous int64, by pointer: a TypeError / ValueError naming
    the argument otherwise. Metadata only."""
    if logits.dtype not in DTYPE_CODE:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [outer, inner, V], got shape {tuple(logits.shape)}")
    if logits.numel() and logits.shape[2] > 1 and logits.stride(2) != 1:  # an empty tensor is read nowhere
        raise ValueError(f"logits must have contiguous rows (last stride 1), got strides {logits.stride()}")
    check_rows("labels", labels, logits.shape[0] * logits.shape[1], torch.int64)


def _outputs(logits: Tensor, labels: Tensor, entropy: bool, sum_p2: bool, argmax: bool, inplace_backward: bool):
    """(logprobs, entropy, sum_p2, argmax, lse, log_c) of the ``[outer, inner, V]`` logits; refuses inputs the
    kernels cannot read (:func:`check_inputs`) and, with ``inplace_backward``, logits whose backward could not
    be written over them."""
    check_inputs(logits, labels)
    if inplace_backward:
        check_inplace_backward(logits)
    n = logits.shape[0] * logits.shape[1]
    return (*stat_outputs(n, logits.device, entropy, sum_p2, argmax),
            torch.empty(n, device=logits.device, dtype=torch.float32))


@kernel_op("token_stats", _outputs)
def token_stats(
    logits: Tensor, labels: Tensor, inv_temperature: float, ignore_index: int,
    entropy: bool, sum_p2: bool, argmax: bool, backend: str, inplace_backward: bool,
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
) -> None:
    """Returns (logprobs, entropy, sum_p2, argmax, lse, log_c); unrequested ones are empty. ``log_c``: the rounding
    of the fp32 lse, ``log sum_j exp(z_j / T - lse)``, at the labelled rows with ``|lse| >= 32`` (0 elsewhere),
    which backward removes from ``log p`` without reading those rows once more (the CUDA kernels form it in their
    backward instead: 0 there).

    ``inplace_backward`` only affects backward: d(logits) overwrites the logits buffer.
    """
    lp, ent, sp2, amax, lse, log_c = out
    O, I, V = logits.shape
    backend = backend_for("token_stats", logits.device, backend)
    if backend == "triton":
        triton_kernels("token_stats").token_stats_forward(
            logits, labels, inv_temperature, ignore_index, lp, opt(ent), opt(sp2), opt(amax), lse, log_c)
        return
    args = (logits.data_ptr(), DTYPE_CODE[logits.dtype], O * I, V, I, logits.stride(0), logits.stride(1),
            labels.data_ptr(), inv_temperature, ignore_index, ptr(lp), ptr(ent), ptr(sp2), ptr(amax), ptr(lse))
    if backend == "cuda":
        _backend.compiled().token_stats_fwd_cuda(*args, _backend.cuda_stream(logits))
        log_c.zero_()
    else:
        _backend.compiled().token_stats_fwd_cpu(*args, ptr(log_c))


def backward_into(grad: Tensor, g_lp, g_ent, g_sp2, logits, labels, lse, log_c, ent, sp2,
                  inv_temperature, ignore_index, backend) -> None:
    """d(loss)/d(logits) written into ``grad`` (``logits`` itself for the in-place backward). ``log_c``: the
    forward's rounding of each row's lse, which the C++ and Triton kernels remove from ``log p`` (the CUDA
    kernels form it themselves)."""
    O, I, V = logits.shape
    g_lp, g_ent, g_sp2 = (None if g is None else g.contiguous().float() for g in (g_lp, g_ent, g_sp2))
    ent, sp2 = opt(ent), opt(sp2)
    backend = backend_for("token_stats_backward", logits.device, backend)
    head = (logits.data_ptr(), DTYPE_CODE[logits.dtype], O * I, V, I, logits.stride(0), logits.stride(1),
            labels.data_ptr(), inv_temperature, ignore_index, ptr(lse))
    tail = (ptr(ent), ptr(sp2), ptr(g_lp), ptr(g_ent), ptr(g_sp2), grad.data_ptr(), grad.stride(0), grad.stride(1))
    with on_device(logits):  # also called outside the op (the single pass's blocks)
        if backend == "triton":
            triton_kernels("token_stats").token_stats_backward(
                logits, labels, inv_temperature, ignore_index, lse, ent, sp2, g_lp, g_ent, g_sp2, grad, log_c)
        elif backend == "cuda":
            _backend.compiled().token_stats_bwd_cuda(*head, *tail, _backend.cuda_stream(logits))
        else:
            _backend.compiled().token_stats_bwd_cpu(*head, ptr(log_c), *tail)


def _grad_outputs(logits: Tensor, labels: Tensor):
    check_inputs(logits, labels)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@kernel_op("token_stats_backward", _grad_outputs)
def token_stats_backward(
    grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], grad_sum_p2: Optional[Tensor],
    logits: Tensor, labels: Tensor, lse: Tensor, log_c: Tensor, entropy: Tensor, sum_p2: Tensor,
    inv_temperature: float, ignore_index: int, backend: str, out: Tensor,
) -> None:
    """d(loss)/d(logits) in the logits dtype, for whichever output gradients are given; ``lse`` and ``log_c`` the
    forward's."""
    backward_into(out, grad_logprobs, grad_entropy, grad_sum_p2, logits, labels, lse, log_c, entropy, sum_p2,
                  inv_temperature, ignore_index, backend)


def _no_outputs(logits: Tensor, labels: Tensor):
    check_inputs(logits, labels)
    return None


@kernel_op("token_stats_backward_", _no_outputs, mutates_args=("logits",))
def token_stats_backward_(
    grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], grad_sum_p2: Optional[Tensor],
    logits: Tensor, labels: Tensor, lse: Tensor, log_c: Tensor, entropy: Tensor, sum_p2: Tensor,
    inv_temperature: float, ignore_index: int, backend: str, out: None,
) -> None:
    """In-place backward: overwrites ``logits`` with d(loss)/d(logits) (saves one [N, V] buffer)."""
    backward_into(logits, grad_logprobs, grad_entropy, grad_sum_p2, logits, labels, lse, log_c, entropy, sum_p2,
                  inv_temperature, ignore_index, backend)


def _setup_context(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index, _ent, _sp2, _amax, backend, inplace = inputs
    _lp, ent, sp2, _amax_out, lse, log_c = output
    save_for_backward(ctx, logits, labels, lse, log_c, ent, sp2)
    ctx.inv_temperature, ctx.ignore_index, ctx.backend = inv_temperature, ignore_index, backend
    ctx.inplace = inplace
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lp, g_ent, g_sp2, _g_amax, _g_lse, _g_log_c, direct: bool = False):
    """d(logits); ``direct``: the non-in-place backward without the custom-op dispatch (the in-place one keeps
    the op, which records the write over the logits)."""
    logits, labels, lse, log_c, ent, sp2 = ctx.saved_tensors
    g_ent = g_ent if ent.numel() else None
    g_sp2 = g_sp2 if sp2.numel() else None
    args = (g_lp, g_ent, g_sp2, logits, labels, lse, log_c, ent, sp2, ctx.inv_temperature, ctx.ignore_index,
            ctx.backend)
    if ctx.inplace:
        token_stats_backward_(*args)
        grad = logits
    else:
        grad = token_stats_backward.direct(*args) if direct else token_stats_backward(*args)
    return grad, None, None, None, None, None, None, None, None

token_stats.register_autograd(_backward, setup_context=_setup_context)


_TokenStatsEager = eager_autograd(token_stats, _setup_context, _backward, "token statistics", (3,))  # (3: argmax)


def token_stats_call(logits: Tensor, labels: Tensor, inv_temperature: float, ignore_index: int, entropy: bool,
                     sum_p2: bool, argmax: bool, backend: str, inplace_backward: bool):
    """``token_stats``: the custom op under tracing or off the C++ path, a plain autograd function over the same
    kernels where :func:`~fastalign.ops._launch.runs_directly` allows. Same results."""
    args = (logits, labels, inv_temperature, ignore_index, entropy, sum_p2, argmax, backend, inplace_backward)
    if runs_directly(backend, logits, labels):
        if torch.is_grad_enabled() and logits.requires_grad:
            return _TokenStatsEager.apply(*args)
        return token_stats.direct(*args)  # nothing to differentiate
    return token_stats(*args)
