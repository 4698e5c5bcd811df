"""The per-token KL estimators (docs/math.md#kl-estimators) as torch ops, and in eager calls (k2, k3 and the
straight-through estimators) as one kernel pass for the value and one for the gradient: C++ on CPU tensors
(``csrc/cpu/kl_penalty.cpp``, with the table of ``csrc/cpu/kl_estimators.h`` that the fused policy loop uses too),
Triton on CUDA tensors (``fastalign/kernels/kl_penalty.py``, the table of ``kernels/kl_estimators.py``). Same
results up to the rounding of ``exp``; everywhere else (torch.compile, which fuses the torch ops, functorch
transforms, a ``create_graph`` backward) and for k1 and abs the torch ops run.

``base`` is ``"k1"``, ``"abs"``, ``"k2"`` or ``"k3"``; ``straight``: the value of ``base`` with the gradient of k2;
``kl_clamp``: k3's clamps. ``ref_logprobs`` is a constant.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend
from fastalign.ops._launch import DTYPE_CODE, eager_family, on_device, save_for_backward, triton_kernels

#: the kernel's codes of the estimators
KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}

# 1/9!, 1/8!, ..., 1/2!: the series of exp(x) - x - 1 = x^2 (1/2! + x/3! + ... + x^7/9!) below |x| = 0.5
_K3_SERIES = (1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5)


class _K3(torch.autograd.Function):
    """k3(x) = exp(x) - x - 1 and its derivative expm1(x) without cancellation near x = 0: in fp32,
    exp(x) - x - 1 loses every digit below |x| ~ 3e-4, expm1(x) - x is off by ~1e-7 / |x| (relative), and
    autograd of either forms exp(x) - 1. The value is the series below |x| = 0.5 (truncation < 3e-9 relative),
    expm1(x) - x elsewhere (+-inf and NaN included); the backward is written in differentiable ops (second
    derivatives work)."""

    generate_vmap_rule = True  # torch.func transforms (vmap, grad, jacrev) apply it as they apply its ops

    @staticmethod
    def forward(x):
        p = torch.full_like(x, _K3_SERIES[0])
        for c in _K3_SERIES[1:]:
            p = p * x + c
        return torch.where(x.abs() < 0.5, x * x * p, torch.expm1(x) - x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.expm1(x)


def kl_penalty_torch(logprobs: Tensor, ref_logprobs: Tensor, base: str, straight: bool, kl_clamp: bool) -> Tensor:
    """The estimate in torch ops, fp32, differentiable in ``logprobs`` (any order)."""
    d = logprobs.float() - ref_logprobs.detach().float()
    if base == "k1":
        v = d
    elif base == "abs":
        v = d.abs()
    elif base == "k2":
        v = 0.5 * d * d
    else:
        x = -d
        if kl_clamp:
            x = x.clamp(-20.0, 20.0)
        v = _K3.apply(x)
        if kl_clamp:
            v = v.clamp(-10.0, 10.0)
    if straight:  # the value of base, the gradient of k2 (d); 0 where d is infinite (no inf - inf), NaN stays NaN
        a = torch.where(torch.isinf(d), torch.zeros((), device=d.device), d)
        c = a.detach()
        # (a - c)(a + c) / 2 = k2(a) - k2(c): 0 in value, a in gradient, 1 in second derivative; the halves are
        # added (not the sum halved) so that no finite |d| overflows, where k2(d) itself would (|d| > 1.8e19)
        v = v.detach() + (a - c) * (0.5 * a + 0.5 * c)
    return v


def _kernel_inputs(logprobs: Tensor, ref_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Both inputs contiguous in one kernel dtype: as they are when they share one, else fp32 (what the torch ops
    compute in)."""
    if logprobs.dtype != ref_logprobs.dtype or logprobs.dtype not in DTYPE_CODE:
        logprobs, ref_logprobs = logprobs.float(), ref_logprobs.float()
    return logprobs.contiguous(), ref_logprobs.contiguous()


def _run(family: str, lp: Tensor, ref: Tensor, options: tuple, out: Optional[Tensor] = None,
         g: Optional[Tensor] = None, grad: Optional[Tensor] = None) -> None:
    """One kernel call of ``family``: the values into ``out``, or with ``g`` (fp32: every element's, or one for
    all) the gradient into ``grad``."""
    base, straight, kl_clamp = options
    g_scalar = g is not None and g.numel() == 1 and lp.numel() > 1
    if family == "triton":
        with on_device(lp):
            triton_kernels("kl_penalty").kl_penalty(lp, ref, KL_CODES[base], straight, kl_clamp, out, g, g_scalar,
                                                    grad)
        return
    _backend.compiled().kl_penalty_cpu(lp.data_ptr(), ref.data_ptr(), DTYPE_CODE[lp.dtype], lp.numel(),
                                       KL_CODES[base], straight, kl_clamp, 0 if out is None else out.data_ptr(),
                                       0 if g is None else g.data_ptr(), g_scalar,
                                       0 if grad is None else grad.data_ptr())


def _values(family: str, logprobs: Tensor, ref_logprobs: Tensor, options: tuple) -> Tensor:
    lp, ref = _kernel_inputs(logprobs, ref_logprobs)
    out = torch.empty(logprobs.shape, dtype=torch.float32, device=logprobs.device)
    if lp.numel():
        _run(family, lp, ref, options, out=out)
    return out


def _upstream(g: Tensor) -> Tensor:
    """The upstream gradient as the kernel reads it: fp32 and contiguous, or its one value when it is one value
    expanded (the gradient of a sum or a mean), which is not copied out."""
    if g.numel() > 1 and all(s == 0 for s in g.stride()):
        return g.reshape(-1)[:1].float()
    return g.float().contiguous()


class _KlPenaltyEager(torch.autograd.Function):
    """The kernel's value, and its gradient in a backward without graph; with ``create_graph=True`` the gradient
    is the torch ops' (differentiable again)."""

    @staticmethod
    def forward(ctx, family, logprobs, ref_logprobs, options):
        save_for_backward(ctx, logprobs, ref_logprobs)  # a reference from an inference pass is copied
        ctx.family, ctx.options = family, options
        return _values(family, logprobs, ref_logprobs, options)

    @staticmethod
    def backward(ctx, g):
        logprobs, ref_logprobs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a gradient that can be differentiated again
            v = kl_penalty_torch(logprobs, ref_logprobs, *ctx.options)
            return None, torch.autograd.grad(v, logprobs, g, create_graph=True)[0], None, None
        lp, ref = _kernel_inputs(logprobs.detach(), ref_logprobs)
        grad = torch.empty_like(lp)
        if lp.numel():
            _run(ctx.family, lp, ref, ctx.options, g=_upstream(g), grad=grad)
        return None, grad.to(logprobs.dtype), None, None


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, base: str, straight: bool, kl_clamp: bool) -> Tensor:
    """The estimate per element, fp32: in a plain eager call the C++ kernel on CPU tensors or the Triton kernel on
    CUDA tensors (:func:`~fastalign.ops._launch.eager_family`) for k2, k3 and the straight-through estimators; the
    torch ops elsewhere, and for k1 and abs, which are one or two torch ops that one kernel pass does not beat."""
    options = (base, bool(straight), bool(kl_clamp))
    family = (straight or base in ("k2", "k3")) and eager_family(("cpp", "triton"), logprobs, ref_logprobs)
    if family:
        if torch.is_grad_enabled() and logprobs.requires_grad:
            return _KlPenaltyEager.apply(family, logprobs, ref_logprobs, options)
        return _values(family, logprobs, ref_logprobs, options)
    return kl_penalty_torch(logprobs, ref_logprobs, *options)
