"""TRL 1.16 ``GMPOTrainer`` profile (``trl.experimental.gmpo``): its loss, gradient and metrics from a ``GMPOConfig``.

``GMPOTrainer._compute_loss`` replaces ``GRPOTrainer``'s loss. With ``l = lp - old``, ``A_i`` the completion's
advantage, ``m`` the completion mask and ``M = m`` times the top-entropy keep mask (``top_entropy_quantile < 1``),
completion ``i`` adds

    -exp(mean_{M_i} c) A_i + beta mean_{m_i} k3,   c = min(l, clamp(l, -eps_low, eps_high)) for A_i > 0, else max,

and the loss is the mean over every completion (each process its own), divided by the gradient-accumulation steps
in training. :class:`GMPOLoss` composes it from fastalign's ``gmpo`` row (docs/math.md#policy-losses) with ``M``
as its response mask, and adds what the row leaves out:

* a completion with no token in ``M`` (empty, or every token dropped by the entropy mask) has ratio
  ``exp(0 / 1) = 1``: it adds the constant ``-A_i`` (no gradient) and counts in the mean;
* ``m`` holds 0 and 1 only, as TRL's trainer builds it: TRL weighs the tokens by a fractional mask (and divides a
  row by its sum clamped at 1), the ``gmpo`` row counts a token or not, so another value is a ``ValueError`` naming
  ``completion_mask`` where its values are on the host (an eager CPU tensor), and a NaN loss elsewhere;
* the KL term (``beta``) is k3 without clamps or bias correction, averaged over ``m`` (the entropy mask does not
  apply to it), per completion;
* the metrics: ``kl`` (with ``beta``), ``entropy``, ``clip_ratio/low_mean`` (``l < -eps_low`` with ``A < 0``),
  ``clip_ratio/high_mean`` (``l > eps_high`` with ``A > 0``), ``clip_ratio/region_mean`` (their sum), token means
  over ``m``, and ``clip_ratio/low_min`` / ``clip_ratio/high_max``, the extremes of the per-completion means over
  the non-empty completions. As in TRL, a batch of one-token completions (``T = 1``) takes these means over every
  row, its mask aside.

``GMPOTrainer``'s loss reads ``epsilon``, ``epsilon_high`` (in log space), ``beta`` and ``top_entropy_quantile``
only; it ignores ``loss_type``, ``importance_sampling_level``, ``delta``, ``use_bias_correction_kl``,
``off_policy_mask_threshold``, the entropy bonus and the vLLM importance-sampling ratio, and so does the profile
(a ratio or sampling log-probs passed to it raise instead of being dropped).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations.trl._config import check_keys
from fastalign.integrations.trl.grpo import _DEFAULTS as GRPO_FIELDS
from fastalign.integrations.trl.grpo import entropy_threshold as batch_threshold
from fastalign.kl import kl_penalty
from fastalign.policy import policy_loss
from fastalign.policy_config import OptionError, PolicyConfig

__all__ = ["GMPOLoss", "is_gmpo_config"]

#: the ``GMPOConfig`` fields GMPO's loss reads, with TRL 1.16's defaults
_DEFAULTS = {"epsilon": 0.4, "epsilon_high": None, "beta": 0.0, "top_entropy_quantile": 1.0,
             "gradient_accumulation_steps": 1}


def is_gmpo_config(args: Any) -> bool:
    """Whether ``args`` is a TRL ``GMPOConfig`` (``trl.experimental.gmpo``) or an instance of a subclass of it."""
    return not isinstance(args, Mapping) and any(
        cls.__name__ == "GMPOConfig" and cls.__module__.startswith("trl.experimental.gmpo")
        for cls in type(args).__mro__)


def _nan_extreme(x: Tensor, largest: bool) -> Tensor:
    """``x``'s max (``largest``) or min over its non-NaN values; NaN when there is none (TRL's nanmax / nanmin)."""
    fill = -math.inf if largest else math.inf
    filled = torch.where(torch.isnan(x), fill, x)
    value = filled.amax() if largest else filled.amin()
    return torch.where(torch.isnan(x).all(), math.nan, value)


class GMPOLoss:
    """TRL's ``GMPOTrainer`` loss from its ``GMPOConfig`` (or a dict of its fields, ``GMPOConfig``'s defaults for
    the others: ``epsilon=0.4``): ``GMPOLoss(gmpo_config)(logprobs, ...)``; ``GRPOLoss(gmpo_config)`` returns one.

    ``__call__(logprobs, old_logprobs, advantages, completion_mask, *, entropy, ref_logprobs=None,
    num_processes=1, training=True, gradient_accumulation_steps=None, entropy_threshold=None)`` takes the tensors
    of ``_compute_loss`` (``advantages`` ``[B]``, one per completion; ``old_logprobs=None``: on-policy) and returns
    ``(loss, metrics)`` under TRL's names (module doc). With ``top_entropy_quantile < 1``, ``entropy_threshold``
    (:func:`fastalign.integrations.trl.entropy_threshold` over every process) replaces this batch's entropy
    quantile. ``num_items_in_batch`` is taken and not read (GMPO's loss is a mean over completions);
    ``importance_sampling_ratio`` / ``sampling_logprobs`` other than None raise: GMPO's loss applies none.
    """

    def __init__(self, args: Any):
        check_keys(args, {**GRPO_FIELDS, **_DEFAULTS}, "GRPOConfig")  # GMPOConfig's fields are GRPOConfig's
        get = args.get if isinstance(args, Mapping) else lambda k, v: getattr(args, k, v)
        c = {k: get(k, v) for k, v in _DEFAULTS.items()}
        for field in ("epsilon", "epsilon_high", "beta", "top_entropy_quantile"):
            if c[field] is not None or field != "epsilon_high":
                _validate.finite_number(f"GMPOConfig.{field}", c[field])
        self.args = args
        self.eps_low = float(c["epsilon"])
        self.eps_high = self.eps_low if c["epsilon_high"] is None else float(c["epsilon_high"])
        self.beta = float(c["beta"])
        self.top_entropy_quantile = float(c["top_entropy_quantile"])
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"GMPOConfig.top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile}")
        ga = c["gradient_accumulation_steps"]
        self.grad_accum = 1 if ga is None else _validate.at_least("GMPOConfig.gradient_accumulation_steps", ga)
        try:  # the geometric mean of the log-clipped ratios
            self.config = PolicyConfig(loss_type="gmpo", eps_low=self.eps_low, eps_high=self.eps_high)
        except OptionError as e:
            field = {"eps_low": "epsilon", "eps_high": "epsilon_high"}.get(e.option)
            if field is None:
                raise
            raise ValueError(f"GMPOConfig.{field}: {e}") from e

    def __call__(self, logprobs: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor,
                 completion_mask: Tensor, *, entropy: Tensor, ref_logprobs: Optional[Tensor] = None,
                 sampling_logprobs: Optional[Tensor] = None, importance_sampling_ratio: Optional[Tensor] = None,
                 num_items_in_batch=None, num_processes: int = 1, training: bool = True,
                 gradient_accumulation_steps: Optional[int] = None,
                 entropy_threshold: Optional[Tensor] = None) -> tuple[Tensor, dict]:
        _validate.floating("logprobs", logprobs, dim=2)
        shape, device = tuple(logprobs.shape), logprobs.device
        B = shape[0]
        if entropy is None:
            raise ValueError("entropy must be a [B, T] tensor like logprobs (TRL logs its token mean), got None")
        per_token = dict(device=device, device_of="logprobs")
        _validate.like(shape, "logprobs.shape", kind="float", **per_token, old_logprobs=old_logprobs,
                       entropy=entropy, ref_logprobs=ref_logprobs)
        _validate.like(shape, "logprobs.shape", kind="real", **per_token,
                       completion_mask=_validate.tensor("completion_mask", completion_mask))
        _validate.like(shape[:1], "[B] (one advantage per completion)", kind="float", **per_token,
                       advantages=_validate.tensor("advantages", advantages))
        for name, given in (("importance_sampling_ratio", importance_sampling_ratio),
                            ("sampling_logprobs", sampling_logprobs)):
            if given is not None:
                raise ValueError(f"{name}: GMPOTrainer's loss applies no importance sampling correction (TRL drops "
                                 "the vLLM ratio); pass None")
        _validate.at_least("num_processes", num_processes)
        _validate.boolean("training", training)
        ga = self.grad_accum
        if gradient_accumulation_steps is not None:
            ga = _validate.at_least("gradient_accumulation_steps", gradient_accumulation_steps)
        if self.beta != 0.0 and ref_logprobs is None:
            raise ValueError("GMPOConfig.beta != 0 needs ref_logprobs")
        if entropy_threshold is not None and self.top_entropy_quantile == 1.0:
            raise ValueError("entropy_threshold applies with top_entropy_quantile < 1 only")
        if old_logprobs is None:
            old_logprobs = logprobs.detach()
        _validate.host_binary_mask("completion_mask", completion_mask)  # elsewhere policy_loss's NaN

        m = completion_mask.float()
        kept = m  # the tokens of the geometric mean
        if self.top_entropy_quantile < 1.0:
            if entropy_threshold is None:
                entropy_threshold = batch_threshold(entropy, m, self.top_entropy_quantile)
            kept = m * ((entropy.detach().float() >= entropy_threshold) & m.bool())
        A = advantages.detach().float()
        loss, _ = policy_loss(logprobs, old_logprobs, advantages, kept, config=self.config)
        # a completion with no kept token: ratio exp(0) = 1, loss -A (the row above gives it 0)
        loss = loss - (A * (kept.sum(-1) == 0)).sum() / B
        kl = None
        if self.beta != 0.0:
            kl = kl_penalty(logprobs, ref_logprobs, "k3", kl_clamp=False)
            loss = loss + self.beta * ((kl * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        if training and ga != 1:
            loss = loss / ga
        return loss, self._metrics(logprobs, old_logprobs, A, m, entropy, kl)

    def _metrics(self, logprobs, old_logprobs, A, m, entropy, kl) -> dict:
        """TRL's GMPO metrics of this batch (the module doc): token means over ``m`` (every row when ``T = 1``)."""
        if m.shape[1] == 1:
            m = torch.ones_like(m)
        count = m.sum().clamp(min=1.0)
        mean = lambda x: (x.detach().float() * m).sum() / count  # noqa: E731
        l = (logprobs.detach().float() - old_logprobs.detach().float())
        low = ((l < -self.eps_low) & (A[:, None] < 0)).float()
        high = ((l > self.eps_high) & (A[:, None] > 0)).float()
        out = {} if kl is None else {"kl": mean(kl)}
        out["entropy"] = mean(entropy)
        out.update({"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
                    "clip_ratio/region_mean": mean(low + high),
                    "clip_ratio/low_min": _nan_extreme((low * m).sum(-1) / m.sum(-1), largest=False),
                    "clip_ratio/high_max": _nan_extreme((high * m).sum(-1) / m.sum(-1), largest=True)})
        return out
