"""``fastalign::policy_loss_rows`` (fused per-token policy loss) and
``fastalign::cov_sums`` / ``fastalign::cov_select`` (Clip-Cov / KL-Cov selection).

``policy_loss_rows`` returns per-row sums ``[B, 11]`` (column 0 is the row's loss
``sum_t m L_t``, the rest are metric partial sums, see ``ROW_COLS``) together with
the per-token d(row loss)/d(logprobs) computed in the same pass. Its autograd backward
only scales those by the upstream gradient of each row; d(row loss)/d(entropy) is
``-entropy_coef * mask``, rebuilt in backward. The launch parameters travel as one
:class:`~fastalign.policy_config.KernelParams` record (a flat float list in the custom op).
Inputs are contiguous ``[B, T]``: float (fp32 for the C++ kernel; any float dtype for
Triton), the mask and the selection ``uint8``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend
from fastalign.ops import cov_fallback
from fastalign.ops._launch import ptr, triton_kernels
from fastalign.policy_config import KernelParams

ROW_COLS = ("loss", "n", "clipped", "clipped_lower", "neg_log_ratio", "kl", "entropy", "selected", "clip_low",
            "clip_high", "phi")
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


def _outputs(lp: Tensor):
    B, T = lp.shape
    f32 = dict(device=lp.device, dtype=torch.float32)
    return torch.empty(B, len(ROW_COLS), **f32), torch.empty(B, T, **f32)


def _rows_impl(
    lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Optional[Tensor], ent: Optional[Tensor],
    roll: Optional[Tensor], keep: Optional[Tensor], iw: Optional[Tensor], sel: Optional[Tensor], params: list[float],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(row sums [B, 11], d(row loss)/d(lp) [B, T]). ``params``: a KernelParams as floats."""
    row, dlp = out = _outputs(lp)
    B, T = lp.shape
    if B == 0:
        return out
    if backend in ("cpp", "cuda"):
        if lp.device.type != "cpu":
            raise ValueError("policy_loss: the compiled kernel runs on CPU tensors; CUDA tensors use Triton")
        _check_param_names()
        _backend.compiled().policy_loss_fwd_cpu(
            B, T, lp.data_ptr(), old.data_ptr(), adv.data_ptr(), mask.data_ptr(), ptr(ref), ptr(ent), ptr(roll),
            ptr(keep), ptr(iw), ptr(sel), row.data_ptr(), dlp.data_ptr(), [float(x) for x in params])
    else:
        triton_kernels("policy_loss").policy_loss_forward(
            lp, old, adv, mask, ref, ent, roll, keep, iw, sel, row, dlp, **KernelParams.from_list(params)._asdict())
    return out


policy_loss_rows = torch.library.custom_op("fastalign::policy_loss_rows", mutates_args=())(_rows_impl)


@policy_loss_rows.register_fake
def _(lp, old, adv, mask, ref, ent, roll, keep, iw, sel, params, backend):
    return _outputs(lp)


def _setup_context(ctx, inputs, output):
    lp, mask, ent, params = inputs[0], inputs[3], inputs[5], inputs[10]
    _row, dlp = output
    ctx.save_for_backward(dlp, mask)
    ctx.lp_dtype = lp.dtype
    ctx.ent_dtype = None if ent is None else ent.dtype
    ctx.ent_coef = float(params[_ENT_COEF])
    ctx.backend = inputs[11]
    ctx.set_materialize_grads(False)


@torch.library.custom_op("fastalign::policy_loss_grads", mutates_args=())
def policy_loss_grads(dlp: Tensor, g_row: Tensor, mask: Tensor, ent_coef: float, want_lp: bool, want_ent: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    """(dlp * g_row[:, :1], -ent_coef * mask * g_row[:, :1]) as fp32 [B, T]; an unwanted output is empty."""
    B, T = dlp.shape
    f32 = dict(device=dlp.device, dtype=torch.float32)
    gl = torch.empty((B, T) if want_lp else (0,), **f32)
    ge = torch.empty((B, T) if want_ent else (0,), **f32)
    if backend == "cpp" and dlp.device.type == "cpu":
        g = g_row.float()
        _backend.compiled().policy_loss_bwd_cpu(B, T, dlp.data_ptr(), g.data_ptr(), g.stride(0), mask.data_ptr(),
                                                float(ent_coef), gl.data_ptr() if want_lp else 0,
                                                ge.data_ptr() if want_ent else 0)
    else:
        g = g_row[:, :1].float()
        if want_lp:
            torch.mul(dlp, g, out=gl)
        if want_ent:
            torch.where(mask != 0, g * -ent_coef, torch.zeros((), **f32), out=ge)
    return gl, ge


@policy_loss_grads.register_fake
def _(dlp, g_row, mask, ent_coef, want_lp, want_ent, backend):
    B, T = dlp.shape
    return (dlp.new_empty((B, T) if want_lp else (0,)), dlp.new_empty((B, T) if want_ent else (0,)))


def _backward(ctx, g_row, _g_dlp):
    dlp, mask = ctx.saved_tensors
    grad_lp, grad_ent = _input_grads(ctx, dlp, g_row, mask, getattr(ctx, "direct", False), ctx.backend)
    return (grad_lp, None, None, None, None, grad_ent) + (None,) * 6


def _input_grads(ctx, dlp: Tensor, g_row: Optional[Tensor], mask: Tensor, direct: bool, backend: str):
    """(d lp, d entropy) in the input dtypes from the per-token d(row loss)/d lp and the row
    gradient. d(row loss)/dH_t = -ent_coef m_t is rebuilt from the mask: no per-token buffer
    is kept from the forward. ``direct``: the C++ kernel without the custom-op dispatch."""
    want_lp = ctx.needs_input_grad[0]
    want_ent = ctx.ent_dtype is not None and ctx.needs_input_grad[5]
    if g_row is None or not (want_lp or want_ent):
        return None, None
    if direct:
        gl, ge = _grads_cpu(dlp, g_row, mask, ctx.ent_coef, want_lp, want_ent)
    else:
        if dlp.shape != mask.shape:
            dlp = mask.new_empty(mask.shape, dtype=torch.float32)  # shape carrier only, not read
        gl, ge = policy_loss_grads(dlp, g_row, mask, ctx.ent_coef, want_lp, want_ent, backend)
    return gl.to(ctx.lp_dtype) if want_lp else None, ge.to(ctx.ent_dtype) if want_ent else None


policy_loss_rows.register_autograd(_backward, setup_context=_setup_context)


class _RowsEager(torch.autograd.Function):
    """``policy_loss_rows`` on the C++ kernels without the custom-op dispatch layers (eager CPU)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _rows_impl(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.direct = True
        ctx.mark_non_differentiable(out[1])
        return out

    @staticmethod
    def backward(ctx, g_row, g_dlp):
        return _backward(ctx, g_row, g_dlp)


def rows(lp, old, adv, mask, ref, ent, roll, keep, iw, sel, params: KernelParams, backend):
    """``policy_loss_rows``: the custom op under tracing or off the C++ path, a plain autograd
    function over the same kernels for eager C++ calls. Same results either way."""
    args = (lp, old, adv, mask, ref, ent, roll, keep, iw, sel, [float(x) for x in params], backend)
    plain = all(t is None or type(t) is Tensor for t in (lp, old, adv, mask, ref, ent, roll, keep, iw, sel))
    if backend == "cpp" and lp.device.type == "cpu" and plain and not torch.compiler.is_compiling():
        return _RowsEager.apply(*args)
    return policy_loss_rows(*args)


# ---------------------------------------------------------------------------------------------
# Clip-Cov / KL-Cov loss in one compiled call (CPU)
# ---------------------------------------------------------------------------------------------

def _cov_outputs(lp: Tensor, want_dlp: bool):
    B, T = lp.shape
    f32 = dict(device=lp.device, dtype=torch.float32)
    return torch.empty(B, len(ROW_COLS), **f32), torch.empty((B, T) if want_dlp else (0,), **f32)


def _cov_rows_impl(
    lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, ref: Optional[Tensor], ent: Optional[Tensor],
    roll: Optional[Tensor], keep: Optional[Tensor], cov: Optional[Tensor], seed: Tensor, params: list[float],
    want_dlp: bool,
) -> tuple[Tensor, Tensor]:
    """Clip-Cov / KL-Cov: (row sums [B, 11], d(row loss)/d(lp) [B, T] or empty), C++ on the CPU.

    Covariance sums, selection and loss in one call: the loss and gradient are computed with
    nothing picked while the selection candidates are collected in the same pass, then the few
    chunks that hold picked tokens are recomputed. ``params``: a KernelParams as floats (loss
    type clip_cov or kl_cov). ``cov`` = fp32 [sum_m A, sum_m lp, n, n_local] (all-reduced means;
    ``n_local`` sets k) or None (local, computed here); ``seed`` = int64 [1]. Inputs: contiguous
    fp32 [B, T], uint8 mask.
    """
    row, dlp = out = _cov_outputs(lp, want_dlp)
    B, T = lp.shape
    if B == 0:
        return out
    if lp.device.type != "cpu":
        raise ValueError("policy_loss_cov_rows: the compiled kernel runs on CPU tensors")
    _check_param_names()
    _backend.compiled().policy_loss_cov_fwd_cpu(
        B, T, lp.data_ptr(), old.data_ptr(), adv.data_ptr(), mask.data_ptr(), ptr(ref), ptr(ent), ptr(roll),
        ptr(keep), ptr(cov), seed.data_ptr(), row.data_ptr(), dlp.data_ptr() if want_dlp else 0,
        [float(x) for x in params])
    return out


policy_loss_cov_rows = torch.library.custom_op("fastalign::policy_loss_cov_rows", mutates_args=())(_cov_rows_impl)


@policy_loss_cov_rows.register_fake
def _(lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params, want_dlp):
    return _cov_outputs(lp, want_dlp)


def _cov_save(ctx, lp, mask, ent, params, dlp):
    ctx.save_for_backward(dlp, mask)
    ctx.lp_dtype = lp.dtype
    ctx.ent_dtype = None if ent is None else ent.dtype
    ctx.ent_coef = float(params[_ENT_COEF])
    ctx.set_materialize_grads(False)


def _cov_setup_context(ctx, inputs, output):
    _cov_save(ctx, inputs[0], inputs[3], inputs[5], inputs[10], output[1])


def _cov_backward(ctx, g_row, _g_dlp, direct=False):
    dlp, mask = ctx.saved_tensors
    grad_lp, grad_ent = _input_grads(ctx, dlp, g_row, mask, direct, "cpp")
    return (grad_lp, None, None, None, None, grad_ent) + (None,) * 6


policy_loss_cov_rows.register_autograd(_cov_backward, setup_context=_cov_setup_context)


def _grads_cpu(dlp: Tensor, g_row: Tensor, mask: Tensor, ent_coef: float, want_lp: bool, want_ent: bool):
    """policy_loss_grads' C++ kernel called directly (eager CPU tensors only)."""
    B, T = mask.shape
    gl = torch.empty((B, T) if want_lp else (0,), dtype=torch.float32)
    ge = torch.empty((B, T) if want_ent else (0,), dtype=torch.float32)
    g = g_row.float()
    _backend.compiled().policy_loss_bwd_cpu(B, T, dlp.data_ptr() if want_lp else 0, g.data_ptr(), g.stride(0),
                                            mask.data_ptr(), float(ent_coef), gl.data_ptr() if want_lp else 0,
                                            ge.data_ptr() if want_ent else 0)
    return gl, ge


class _CovRowsEager(torch.autograd.Function):
    """``policy_loss_cov_rows`` without the custom-op dispatch layers, for eager CPU calls (the
    op's Python-side dispatch costs more than the kernel's fix-up on a 1M-token batch)."""

    @staticmethod
    def forward(ctx, lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params, want_dlp):
        row, dlp = _cov_rows_impl(lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params, want_dlp)
        _cov_save(ctx, lp, mask, ent, params, dlp)
        ctx.mark_non_differentiable(dlp)
        return row, dlp

    @staticmethod
    def backward(ctx, g_row, _g_dlp):
        return _cov_backward(ctx, g_row, _g_dlp, direct=True)


def cov_rows(lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params: KernelParams, want_dlp: bool):
    """``policy_loss_cov_rows``: the custom op under tracing (torch.compile, fake tensors), a plain
    autograd function over the same C++ kernels in eager mode. Same results either way."""
    args = (lp, old, adv, mask, ref, ent, roll, keep, cov, seed, [float(x) for x in params], bool(want_dlp))
    plain = all(t is None or type(t) is Tensor for t in (lp, old, adv, mask, ref, ent, roll, keep, cov, seed))
    if plain and not torch.compiler.is_compiling():
        return _CovRowsEager.apply(*args)
    return policy_loss_cov_rows(*args)


# ---------------------------------------------------------------------------------------------
# Clip-Cov / KL-Cov selection
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastalign::cov_sums", mutates_args=())
def cov_sums(lp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """[sum_m A, sum_m lp, n_valid] (fp32, deterministic order) of contiguous fp32 [B, T] rows."""
    B, T = lp.shape
    if lp.device.type == "cuda" and not _backend.cuda_kernels_usable(lp.device):  # no runnable CUDA kernels
        return cov_fallback.cov_sums(lp, adv, mask)
    out = torch.empty(3, device=lp.device, dtype=torch.float32)
    if lp.device.type == "cuda":
        part = torch.empty(max(B, 1), 3, device=lp.device, dtype=torch.float32)
        _backend.compiled().cov_sums_cuda(B, T, lp.data_ptr(), adv.data_ptr(), mask.data_ptr(), part.data_ptr(),
                                          out.data_ptr(), _backend.cuda_stream(lp))
    else:
        _backend.compiled().cov_sums_cpu(B, T, lp.data_ptr(), adv.data_ptr(), mask.data_ptr(), out.data_ptr())
    return out


@cov_sums.register_fake
def _(lp, adv, mask):
    return torch.empty(3, device=lp.device, dtype=torch.float32)


@torch.library.custom_op("fastalign::cov_select", mutates_args=())
def cov_select(
    lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, sums: Tensor, n_local: Tensor, seed: Tensor, mode: int,
    ratio: float, lb: float, ub: float, eps_low: float, eps_high: float,
) -> Tensor:
    """uint8 [B, T]: tokens picked by Clip-Cov (mode 0) or KL-Cov (mode 1).

    ``sums`` = [sum_m A, sum_m lp, n] for the covariance means (possibly all-reduced),
    ``n_local`` = [n_valid] for k, ``seed`` = int64 [1]; all read on the device.
    """
    if lp.device.type == "cuda" and not _backend.cuda_kernels_usable(lp.device):  # no runnable CUDA kernels
        return cov_fallback.cov_select(lp, old, adv, mask, sums, n_local, seed, mode, ratio, lb, ub, eps_low, eps_high)
    sel = torch.empty(lp.shape, device=lp.device, dtype=torch.uint8)
    N = lp.numel()
    args = (lp.data_ptr(), old.data_ptr(), adv.data_ptr(), mask.data_ptr(), sums.data_ptr(), n_local.data_ptr(),
            seed.data_ptr(), mode, ratio, lb, ub, eps_low, eps_high)
    if lp.device.type == "cuda":
        keys = torch.empty(max(N, 1), device=lp.device, dtype=torch.int64)
        hist = torch.zeros(256, device=lp.device, dtype=torch.int32)
        state = torch.zeros(4, device=lp.device, dtype=torch.int64)
        _backend.compiled().cov_select_cuda(N, *args, keys.data_ptr(), hist.data_ptr(), state.data_ptr(),
                                            sel.data_ptr(), _backend.cuda_stream(lp))
    else:
        _backend.compiled().cov_select_cpu(N, *args, sel.data_ptr())
    return sel


@cov_select.register_fake
def _(lp, old, adv, mask, sums, n_local, seed, mode, ratio, lb, ub, eps_low, eps_high):
    return torch.empty(lp.shape, device=lp.device, dtype=torch.uint8)
