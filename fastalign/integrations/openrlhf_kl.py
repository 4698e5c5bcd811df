r"""OpenRLHF 0.11.2's ``compute_approx_kl`` (``openrlhf/models/utils.py``), the per-token KL estimate of the
policy from the reference that its trainer uses as a KL loss (``algo.kl.use_loss``) or, by default, as a KL
penalty in the reward, computed by :func:`fastalign.kl_penalty`. Import it from
:mod:`fastalign.integrations.openrlhf`. Nothing here imports OpenRLHF.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations._dtypes import float64_as_float32
from fastalign.kl import kl_penalty

__all__ = ["compute_approx_kl"]

#: OpenRLHF's bound on every estimate (``[-10, 10]``) and on the importance weight of the unbiased gradient
#: (``KL_IS_WEIGHT_CLIP``).
KL_CAP = 10.0
KL_ESTIMATORS = ("k1", "k2", "k3")


class _WeightedKLGradient(torch.autograd.Function):
    """The estimate ``value`` (computed without a gradient) whose gradient into ``log_probs`` is ``slope``."""

    @staticmethod
    def forward(ctx, value: Tensor, log_probs: Tensor, slope: Tensor) -> Tensor:
        ctx.save_for_backward(slope)
        ctx.dtype = log_probs.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (slope,) = ctx.saved_tensors
        return None, (grad * slope).to(ctx.dtype), None


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, log_probs_old: Optional[Tensor] = None,
                      kl_estimator: str = "k1", unbiased_gradient: bool = False) -> Tensor:
    r"""OpenRLHF's ``compute_approx_kl``: with ``l = log_probs - log_probs_base`` per token (fp32),

    * ``k1``: ``l``
    * ``k2``: ``l^2 / 2``
    * ``k3``: ``exp(-l) - 1 + l``

    each clamped to ``[-10, 10]`` (no gradient where the clamp binds), fp32, the shape of ``log_probs``.

    ``unbiased_gradient=True`` keeps that value and gives it the gradient ``w l`` into ``log_probs`` (the
    importance-weighted gradient of the reverse KL, the same for the three estimators), ``w = min(exp(log_probs -
    log_probs_old), 10)`` without a gradient, or 1 without ``log_probs_old``; without ``unbiased_gradient``,
    ``log_probs_old`` is not read, as OpenRLHF's trainer passes it either way. ``log_probs_base`` and
    ``log_probs_old`` get no gradient (OpenRLHF's trainer computes them without one). The three log-probs share one
    shape (OpenRLHF broadcasts them; a different shape raises here). An unknown ``kl_estimator`` raises
    ``ValueError``, as OpenRLHF's.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    _validate.boolean("unbiased_gradient", unbiased_gradient)
    _validate.any_float("log_probs", log_probs)
    _validate.any_float("log_probs_base", log_probs_base)
    _validate.same_device(log_probs=log_probs, log_probs_base=log_probs_base)
    _validate.shape("log_probs_base", log_probs_base, log_probs.shape, "log_probs.shape")
    log_probs, log_probs_base = float64_as_float32(log_probs), float64_as_float32(log_probs_base)
    if not unbiased_gradient:
        return kl_penalty(log_probs, log_probs_base, kl_estimator).clamp(-KL_CAP, KL_CAP)
    with torch.no_grad():
        value = kl_penalty(log_probs, log_probs_base, kl_estimator).clamp(-KL_CAP, KL_CAP)
        slope = log_probs.float() - log_probs_base.float()
        if log_probs_old is not None:
            _validate.any_float("log_probs_old", log_probs_old)
            _validate.shape("log_probs_old", log_probs_old, log_probs.shape, "log_probs.shape")
            _validate.same_device(log_probs=log_probs, log_probs_old=log_probs_old)
            slope = slope * (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_CAP)
    return _WeightedKLGradient.apply(value, log_probs, slope)
