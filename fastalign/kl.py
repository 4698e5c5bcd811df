"""KL estimators between the policy and a reference policy, per token (docs/math.md#kl-estimators)."""
from __future__ import annotations

from torch import Tensor

from fastalign import _validate
from fastalign._deprecate import renamed
from fastalign.ops.kl_penalty import kl_penalty as ops_kl_penalty

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
    return ops_kl_penalty(logprobs, ref_logprobs, base, straight, kl_clamp)
