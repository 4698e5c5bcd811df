"""KL estimators between the policy and a reference policy, per token (docs/math.md#kl-estimators)."""
from __future__ import annotations

import torch
from torch import Tensor

from fastalign import _validate
from fastalign._deprecate import renamed

KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def canonical_kl(kind: str, name: str = "kl_type") -> tuple[str, bool]:
    """("k1" | "abs" | "k2" | "k3", straight_through) for a KL name such as ``"low_var_kl+"``
    (``name``: the argument it came from, for the error message)."""
    if not isinstance(kind, str):
        raise TypeError(f"{name} must be a string, got {type(kind).__name__}")
    straight = kind.endswith("+")
    base = kind[:-1] if straight else kind
    if base not in KL_KINDS:
        raise ValueError(f"{name} must be one of {KL_KINDS} (optionally with a trailing '+'), got {kind!r}")
    return _ALIASES.get(base, base), straight


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


@renamed(kind="kl_type", clamp="kl_clamp")
def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kl_type: str = "k3", *, kl_clamp: bool = True) -> Tensor:
    r"""Per-token KL estimate of the policy ``lp`` from the reference ``ref``, fp32 (``kl_type`` below).

    With ``x = ref - lp``:

    * ``k1`` / ``kl``: ``lp - ref``
    * ``abs``: ``|lp - ref|``
    * ``k2`` / ``mse``: ``0.5 (lp - ref)^2``
    * ``k3`` / ``low_var_kl``: ``exp(x) - x - 1`` with x clamped to [-20, 20] and the result to
      [-10, 10] (``kl_clamp=False`` drops both clamps); value and gradient ``1 - exp(x)`` evaluated
      without cancellation near ``x = 0`` (fp32-accurate at any small ``|x|``)
    * ``NAME+``: the value of NAME with the gradient of k2 (straight-through); at an infinite
      ``lp - ref`` the value of NAME and a zero gradient (as in :func:`fastalign.policy_loss`).

    Differentiable in ``logprobs`` (the reference is treated as a constant). ``kl_type`` and ``kl_clamp`` are
    the names :func:`fastalign.policy_loss` uses for the same choices; ``kind`` and ``clamp`` are their former
    names here, deprecated.
    """
    _validate.floating("logprobs", logprobs)
    _validate.floating("ref_logprobs", ref_logprobs)
    _validate.same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    _validate.shape("ref_logprobs", ref_logprobs, logprobs.shape, "logprobs.shape")
    base, straight = canonical_kl(kl_type, "kl_type")
    _validate.boolean("kl_clamp", kl_clamp)
    lp = logprobs.float()
    d = lp - ref_logprobs.detach().float()
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
        d_grad = torch.where(torch.isinf(d), torch.zeros((), device=d.device), d)
        k2 = 0.5 * d_grad * d_grad
        v = k2 - k2.detach() + v.detach()
    return v
