"""Whitening over weighted tokens (docs/math.md#advantages) in float64: torch ops on any device, and for
:func:`masked_whiten` in a plain eager call three passes of a kernel with float64 sums over fixed blocks: one call
of the C++ kernel on CPU tensors (``csrc/cpu/masked_whiten.cpp``), three launches of the Triton kernel on CUDA
tensors (``fastalign/kernels/masked_whiten.py``). Same results up to the order of the float64 sums."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastalign import _backend
from fastalign.ops._launch import eager_family, on_device, triton_kernels

#: the kernel's mask dtypes; a bool mask is read as fp32 (exact, and the loops stay SIMD), any other as fp64
_MASK_CODES = {torch.float32: 0, torch.float64: 1}


def weighted_whiten(x: Tensor, w: Tensor, eps: float, unbiased: bool = True) -> Tensor:
    """``(x - mean) * inv_std`` in float64 over the weights ``w`` (float64; 0: left out by selection, so a NaN
    there changes nothing, and its output is 0). ``N = sum w``, ``mean = sum w x / N``; ``unbiased``:
    ``rsqrt(sum w (x - mean)^2 / (N - 1) + eps)``, NaN where ``0 < N <= 1`` (the unbiased variance of less
    than two tokens is undefined; verl refuses such a batch); otherwise ``rsqrt(max(sum w (x - mean)^2 / N,
    eps))``."""
    valid = w != 0
    x64 = torch.where(valid, x.to(torch.float64), 0.0)
    n = w.sum()
    n_or_one = torch.where(n > 0, n, 1.0)  # N = 0: every token left out, so no output reads the statistics
    mean = (w * x64).sum() / n_or_one
    sq = torch.where(valid, w * (x64 - mean) ** 2, 0.0).sum()
    if unbiased:  # verl: the unbiased variance plus eps
        inv_std = torch.rsqrt(sq / torch.where(n > 1.0, n - 1.0, math.nan) + eps)
    else:  # OpenRLHF: the biased variance, floored at eps
        inv_std = torch.rsqrt((sq / n_or_one).clamp_min(eps))
    return torch.where(valid, (x64 - mean) * inv_std, 0.0)


def _triton(x: Tensor, mask: Tensor, eps: float, unbiased: bool) -> Tensor:
    """The Triton kernel: x in its own dtype (read as float64) and the mask in its own (bool included)."""
    xk, mk = x.contiguous(), mask.contiguous()
    out = torch.empty_like(xk)
    if xk.numel():
        with on_device(xk):
            triton_kernels("masked_whiten").masked_whiten(xk, mk, out, float(eps), bool(unbiased))
    return out


def _cpp(x: Tensor, mask: Tensor, eps: float, unbiased: bool) -> Tensor:
    """The C++ kernel: x as fp32 or fp64, the mask as fp32 (bool) or fp64."""
    xk = x if x.dtype in (torch.float32, torch.float64) else x.double()  # one rounding to x's dtype, at the end
    xk = xk.contiguous()
    mk = mask.float() if mask.dtype == torch.bool else mask if mask.dtype in _MASK_CODES else mask.double()
    mk = mk.contiguous()
    out = torch.empty_like(xk)
    if xk.numel():
        _backend.compiled().masked_whiten_cpu(xk.data_ptr(), xk.dtype == torch.float64, mk.data_ptr(),
                                              _MASK_CODES[mk.dtype], xk.numel(), float(eps), bool(unbiased),
                                              out.data_ptr())
    return out.to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, eps: float, unbiased: bool) -> Tensor:
    """``weighted_whiten(x, m) * m`` in x's dtype (``mask`` of x's shape, any real dtype): in a plain eager call
    where neither input takes a gradient the C++ kernel on CPU tensors, the Triton kernel on CUDA tensors
    (:func:`~fastalign.ops._launch.eager_family`), the torch ops elsewhere."""
    family = eager_family(("cpp", "triton"), x, mask)
    if family and not (torch.is_grad_enabled() and (x.requires_grad or mask.requires_grad)):
        return (_cpp if family == "cpp" else _triton)(x, mask, eps, unbiased)
    m = mask.to(torch.float64)
    return (weighted_whiten(x, m, eps, unbiased) * m).to(x.dtype)
