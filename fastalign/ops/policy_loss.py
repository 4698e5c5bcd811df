"""``fastalign::policy_loss_rows`` (fused per-token policy loss) and
``fastalign::cov_sums`` / ``fastalign::cov_select`` (Clip-Cov / KL-Cov selection).

``policy_loss_rows`` returns per-row sums ``[B, 11]`` (column 0 is the row's loss
``sum_t m L_t``, the rest are metric partial sums, see ``ROW_COLS``) together with
the per-token d(row loss)/d(logprobs) computed in the same pass and the per-sequence clip
extremes ``[2]`` read from the row sums (:func:`clip_extremes`). Its autograd backward
only scales those by the upstream gradient of each row; d(row loss)/d(entropy) is
``-entropy_coef * mask``, rebuilt in backward. The launch parameters travel as one
:class:`~fastalign.ops.policy_params.KernelParams` record (a flat float list in the custom op).
Inputs are contiguous ``[B, T]``: float (fp32 for the C++ kernel; any float dtype for
Triton), the mask and the selection ``uint8``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend
from fastalign._backend import backend_for
from fastalign.ops import cov_fallback
from fastalign.ops._launch import (kernel_op, ptr, refuse_second_derivative, runs_directly, save_for_backward,
                                   triton_kernels)
from fastalign.ops.policy_params import KernelParams

#: column 7: the Clip-Cov / KL-Cov pick count, or vespo's sum_m phi_t ((k, lambda) by the sign of A_t);
#: column 10: vespo's phi of the row ((k, lambda) by the sign of the row's mean advantage)
ROW_COLS = ("loss", "n", "clipped", "clipped_lower", "neg_log_ratio", "kl", "entropy", "selected_or_phi",
            "clip_low", "clip_high", "phi_row")
_ENT_COEF = KernelParams._fields.index("entropy_coef")
_names_checked = False


def _check_param_names() -> None:
    """The C++ struct reads the parameters in KernelParams order: compare the names once."""
    global _names_checked
    if not _names_checked:
        names = tuple(_backend.compiled().policy_loss_param_names())
        if names != KernelParams._fields:
            raise RuntimeError(f"policy-loss parameter order differs between Python {KernelParams._fields} "
                               f"and the compiled kernel {names}; rebuild the extension")
        _names_checked = True


def clip_extremes(row: Tensor) -> Tensor:
    """fp32 ``[2]``: the min over the rows with a valid token of ``#clip_low / n`` and the max of ``#clip_high / n``
    (NaN when no row has one), from the row sums ``[B, 11]``. The C++ kernels write it after their rows; this is
    the same computation in torch (the Triton path), fp32 quotients and all."""
    n = row[:, 1:2]
    frac = row[:, 8:10] / n.clamp_min(1)
    counted = n > 0
    # scalar fills, not a tensor copied from the host (which would wait for the device)
    low, high = torch.where(counted, frac[:, :1], math.inf), torch.where(counted, frac[:, 1:], -math.inf)
    ext = torch.stack((low.amin(), high.amax())) if row.shape[0] else frac.new_full((2,), math.nan)
    return torch.where(counted.any(), ext, math.nan)


def _outputs(lp: Tensor):
    B, T = lp.shape
    f32 = dict(device=lp.device, dtype=torch.float32)
    return torch.empty(B, len(ROW_COLS), **f32), torch.empty(B, T, **f32), torch.empty(2, **f32)


@kernel_op("policy_loss_rows", _outputs)
def policy_loss_rows(
    lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Optional[Tensor], ent: Optional[Tensor],
    roll: Optional[Tensor], keep: Optional[Tensor], iw: Optional[Tensor], sel: Optional[Tensor], params: list[float],
    backend: str, out: tuple[Tensor, Tensor, Tensor],
) -> None:
    """(row sums [B, 11], d(row loss)/d(lp) [B, T], :func:`clip_extremes` [2]). ``params``: a KernelParams as
    floats."""
    row, dlp, ext = out
    B, T = lp.shape
    if backend_for("policy_loss_rows", lp.device, backend) == "cpp":
        _check_param_names()
        _backend.compiled().policy_loss_fwd_cpu(
            B, T, lp.data_ptr(), old.data_ptr(), adv.data_ptr(), mask.data_ptr(), ptr(ref), ptr(ent), ptr(roll),
            ptr(keep), ptr(iw), ptr(sel), ptr(row), ptr(dlp), ext.data_ptr(), params)
    else:
        if B > 0:
            triton_kernels("policy_loss").policy_loss_forward(
                lp, old, adv, mask, ref, ent, roll, keep, iw, sel, row, dlp,
                **KernelParams.from_list(params)._asdict())
        ext.copy_(clip_extremes(row))


def _setup_context(ctx, inputs, output):
    lp, mask, ent, params = inputs[0], inputs[3], inputs[5], inputs[10]
    dlp = output[1]
    save_for_backward(ctx, dlp, mask)
    ctx.lp_dtype = lp.dtype
    ctx.ent_dtype = None if ent is None else ent.dtype
    ctx.ent_coef = float(params[_ENT_COEF])
    ctx.backend = inputs[11]
    ctx.set_materialize_grads(False)


def _grad_outputs(dlp: Tensor, want_lp: bool, want_ent: bool):
    B, T = dlp.shape
    f32 = dict(device=dlp.device, dtype=torch.float32)
    return torch.empty((B, T) if want_lp else (0,), **f32), torch.empty((B, T) if want_ent else (0,), **f32)


@kernel_op("policy_loss_grads", _grad_outputs)
def policy_loss_grads(dlp: Tensor, g_row: Tensor, mask: Tensor, ent_coef: float, want_lp: bool, want_ent: bool,
                      backend: str, out: tuple[Tensor, Tensor]) -> None:
    """(dlp * g_row[:, :1], -ent_coef * mask * g_row[:, :1]) as fp32 [B, T]; an unwanted output is empty."""
    gl, ge = out
    B, T = dlp.shape
    if backend_for("policy_loss_grads", dlp.device, backend) == "cpp":
        g = g_row.float()
        _backend.compiled().policy_loss_bwd_cpu(B, T, dlp.data_ptr() if want_lp else 0, g.data_ptr(), g.stride(0),
                                                mask.data_ptr(), float(ent_coef), ptr(gl), ptr(ge))
    else:
        g = g_row[:, :1].float()
        if want_lp:
            torch.mul(dlp, g, out=gl)
        if want_ent:
            torch.where(mask != 0, g * -ent_coef, torch.zeros((), device=dlp.device, dtype=torch.float32), out=ge)


def _backward(ctx, g_row, _g_dlp, _g_ext):
    dlp, mask = ctx.saved_tensors
    grad_lp, grad_ent = _input_grads(ctx, dlp, g_row, mask, getattr(ctx, "direct", False), ctx.backend)
    return (grad_lp, None, None, None, None, grad_ent) + (None,) * 6


def _input_grads(ctx, dlp: Tensor, g_row: Optional[Tensor], mask: Tensor, direct: bool, backend: str):
    """(d lp, d entropy) in the input dtypes from the per-token d(row loss)/d lp and the row
    gradient. d(row loss)/dH_t = -ent_coef m_t is rebuilt from the mask: no per-token buffer
    is kept from the forward. ``direct``: the implementation without the custom-op dispatch."""
    want_lp = ctx.needs_input_grad[0]
    want_ent = ctx.ent_dtype is not None and ctx.needs_input_grad[5]
    if g_row is None or not (want_lp or want_ent):
        return None, None
    if dlp.shape != mask.shape:
        dlp = mask.new_empty(mask.shape, dtype=torch.float32)  # shape carrier only, not read
    args = (dlp, g_row, mask, ctx.ent_coef, want_lp, want_ent, backend)
    gl, ge = policy_loss_grads.direct(*args) if direct else policy_loss_grads(*args)
    return gl.to(ctx.lp_dtype) if want_lp else None, ge.to(ctx.ent_dtype) if want_ent else None


policy_loss_rows.register_autograd(_backward, setup_context=_setup_context)


class _RowsEager(torch.autograd.Function):
    """``policy_loss_rows`` on the C++ kernels without the custom-op dispatch layers (eager CPU). Like the op,
    differentiable once: its backward scales the kernel's d(row loss)/d(lp), which has no graph."""

    @staticmethod
    def forward(ctx, *inputs):
        out = policy_loss_rows.direct(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.direct = True
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    @staticmethod
    def backward(ctx, g_row, g_dlp, g_ext):
        refuse_second_derivative("policy loss")
        return _backward(ctx, g_row, g_dlp, g_ext)


def rows(lp, old, adv, mask, ref, ent, roll, keep, iw, sel, params: list[float], backend):
    """``policy_loss_rows``: the custom op under tracing or off the C++ path, a plain autograd
    function over the same kernels where :func:`~fastalign.ops._launch.runs_directly`. Same results.
    ``params``: a KernelParams as the flat float list the op carries."""
    args = (lp, old, adv, mask, ref, ent, roll, keep, iw, sel, params, backend)
    if runs_directly(backend, lp, old, adv, mask, ref, ent, roll, keep, iw, sel):
        if torch.is_grad_enabled() and (lp.requires_grad or (ent is not None and ent.requires_grad)):
            return _RowsEager.apply(*args)
        return policy_loss_rows.direct(*args)  # nothing to differentiate
    return policy_loss_rows(*args)


# ---------------------------------------------------------------------------------------------
# Clip-Cov / KL-Cov loss in one compiled call (CPU)
# ---------------------------------------------------------------------------------------------

def _cov_outputs(lp: Tensor, want_dlp: bool):
    B, T = lp.shape
    f32 = dict(device=lp.device, dtype=torch.float32)
    return torch.empty(B, len(ROW_COLS), **f32), torch.empty((B, T) if want_dlp else (0,), **f32), torch.empty(2, **f32)


@kernel_op("policy_loss_cov_rows", _cov_outputs)
def policy_loss_cov_rows(
    lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Optional[Tensor], ent: Optional[Tensor],
    roll: Optional[Tensor], keep: Optional[Tensor], cov: Optional[Tensor], seed: Tensor, params: list[float],
    want_dlp: bool, out: tuple[Tensor, Tensor, Tensor],
) -> None:
    """Clip-Cov / KL-Cov: (row sums [B, 11], d(row loss)/d(lp) [B, T] or empty, :func:`clip_extremes` [2]), C++
    on the CPU.

    Covariance sums, selection and loss in one call: the loss and gradient are computed with
    nothing picked while the selection candidates are collected in the same pass, then the few
    chunks that hold picked tokens are recomputed. ``params``: a KernelParams as floats (loss
    type clip_cov or kl_cov). ``cov`` = fp32 [sum_m A, sum_m lp, n, n_local] (all-reduced means;
    ``n_local`` sets k) or None (local, computed here); ``seed`` = int64 [1]. Inputs: contiguous
    fp32 [B, T], uint8 mask.
    """
    row, dlp, ext = out
    B, T = lp.shape
    backend_for("policy_loss_cov_rows", lp.device, "auto")  # refuses tensors the C++ kernel cannot read
    _check_param_names()
    _backend.compiled().policy_loss_cov_fwd_cpu(
        B, T, lp.data_ptr(), old.data_ptr(), adv.data_ptr(), mask.data_ptr(), ptr(ref), ptr(ent), ptr(roll),
        ptr(keep), ptr(cov), seed.data_ptr(), ptr(row), ptr(dlp), ext.data_ptr(), params)


def _cov_save(ctx, lp, mask, ent, params, dlp):
    save_for_backward(ctx, dlp, mask)
    ctx.lp_dtype = lp.dtype
    ctx.ent_dtype = None if ent is None else ent.dtype
    ctx.ent_coef = float(params[_ENT_COEF])
    ctx.set_materialize_grads(False)


def _cov_setup_context(ctx, inputs, output):
    _cov_save(ctx, inputs[0], inputs[3], inputs[5], inputs[10], output[1])


def _cov_backward(ctx, g_row, _g_dlp, _g_ext, direct=False):
    dlp, mask = ctx.saved_tensors
    grad_lp, grad_ent = _input_grads(ctx, dlp, g_row, mask, direct, "cpp")
    return (grad_lp, None, None, None, None, grad_ent) + (None,) * 6


policy_loss_cov_rows.register_autograd(_cov_backward, setup_context=_cov_setup_context)


class _CovRowsEager(torch.autograd.Function):
    """``policy_loss_cov_rows`` without the custom-op dispatch layers, for eager CPU calls (the
    op's Python-side dispatch costs more than the kernel's fix-up on a 1M-token batch). Differentiable once,
    like the op."""

    @staticmethod
    def forward(ctx, lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params, want_dlp):
        row, dlp, ext = policy_loss_cov_rows.direct(lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params,
                                                    want_dlp)
        _cov_save(ctx, lp, mask, ent, params, dlp)
        ctx.mark_non_differentiable(dlp, ext)
        return row, dlp, ext

    @staticmethod
    def backward(ctx, g_row, _g_dlp, _g_ext):
        refuse_second_derivative("policy loss")
        return _cov_backward(ctx, g_row, _g_dlp, _g_ext, direct=True)


def cov_rows(lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params: list[float], want_dlp: bool):
    """``policy_loss_cov_rows``: the custom op under tracing (torch.compile, fake tensors), a plain
    autograd function over the same C++ kernels where :func:`~fastalign.ops._launch.runs_directly`.
    Same results either way. ``params``: a KernelParams as a flat float list."""
    args = (lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params, bool(want_dlp))
    if runs_directly("cpp", lp, old, adv, mask, ref, ent, roll, keep, cov, seed):
        return _CovRowsEager.apply(*args)
    return policy_loss_cov_rows(*args)


# ---------------------------------------------------------------------------------------------
# Clip-Cov / KL-Cov selection
# ---------------------------------------------------------------------------------------------

def _sums_outputs(lp: Tensor):
    return torch.empty(3, device=lp.device, dtype=torch.float32)


@kernel_op("cov_sums", _sums_outputs)
def cov_sums(lp: Tensor, adv: Tensor, mask: Tensor, backend: str, out: Tensor) -> None:
    """[sum_m A, sum_m lp, n_valid] (fp32, deterministic) of contiguous fp32 [B, T] rows, summed in fp64 on every
    backend, so that the means, and the picks among tied covariances, agree."""
    B, T = lp.shape
    backend = backend_for("cov_sums", lp.device, backend)
    if backend == "torch":
        out.copy_(cov_fallback.cov_sums(lp, adv, mask))
    elif backend == "cuda":
        part = torch.empty(max(B, 1), 3, device=lp.device, dtype=torch.float64)
        _backend.compiled().cov_sums_cuda(B, T, lp.data_ptr(), adv.data_ptr(), mask.data_ptr(), part.data_ptr(),
                                          out.data_ptr(), _backend.cuda_stream(lp))
    else:
        _backend.compiled().cov_sums_cpu(B, T, lp.data_ptr(), adv.data_ptr(), mask.data_ptr(), out.data_ptr())


def _select_outputs(lp: Tensor):
    return torch.empty(lp.shape, device=lp.device, dtype=torch.uint8)


@kernel_op("cov_select", _select_outputs)
def cov_select(
    lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, sums: Tensor, n_local: Tensor, seed: Tensor, mode: int,
    ratio: float, lb: float, ub: float, eps_low: float, eps_high: float, backend: str, out: Tensor,
) -> None:
    """uint8 [B, T]: tokens picked by Clip-Cov (mode 0) or KL-Cov (mode 1).

    ``sums`` = [sum_m A, sum_m lp, n] for the covariance means (possibly all-reduced),
    ``n_local`` = [n_valid] for k, ``seed`` = int64 [1]; all read on the device.
    """
    backend = backend_for("cov_select", lp.device, backend)
    if backend == "torch":
        out.copy_(cov_fallback.cov_select(lp, old, adv, mask, sums, n_local, seed, mode, ratio, lb, ub, eps_low,
                                          eps_high))
        return
    N = lp.numel()
    args = (lp.data_ptr(), old.data_ptr(), adv.data_ptr(), mask.data_ptr(), sums.data_ptr(), n_local.data_ptr(),
            seed.data_ptr(), mode, ratio, lb, ub, eps_low, eps_high)
    if backend == "cuda":
        keys = torch.empty(max(N, 1), device=lp.device, dtype=torch.int64)
        hist = torch.zeros(256, device=lp.device, dtype=torch.int32)
        state = torch.zeros(4, device=lp.device, dtype=torch.int64)
        _backend.compiled().cov_select_cuda(N, *args, keys.data_ptr(), hist.data_ptr(), state.data_ptr(),
                                            out.data_ptr(), _backend.cuda_stream(lp))
    else:
        _backend.compiled().cov_select_cpu(N, *args, out.data_ptr())
