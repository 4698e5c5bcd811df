"""TRL 1.16 ``IWOPDTrainer`` profile (``trl.experimental.iw_opd``): its sampled-token IW-OPD loss and metrics.

Importance-weighted on-policy distillation trains the student on its own sampled tokens with the teacher's
log-ratio over the rollout policy as the advantage, weighted by the share of the sequence's discrepancy still ahead
(:func:`fastalign.iw_opd_advantages`), and REINFORCE's ``-A lp``:

    a_t = lt_t - lr_t,  w_t = 1 + gamma (1 - sum_{s<t} |a_s| / max(sum_s |a_s|, eps)),
    loss = -sum_t m_t w_t a_t lp_t / n

with ``lp`` the student's log-probs of the sampled tokens at the config's ``temperature`` (the caller's, e.g. from
hidden states with :func:`fastalign.linear_logprobs`), ``lt`` the teacher's at the same temperature, ``lr`` the
rollout's (default: ``lp`` detached, on-policy), ``m`` the completion mask and ``n`` TRL's ``num_items_in_batch``
when given (divided by as it is, as TRL), else the local token count (at least 1). From hidden states without the
logits, the same loss is :class:`fastalign.LinearPolicyLoss` with ``loss_type="reinforce"`` and the advantages of
:func:`fastalign.iw_opd_advantages` (``agg="token-mean"``, ``global_tokens=n``).
``gamma`` and ``eps`` are ``IWOPDConfig.iw_opd_gamma`` and ``iw_opd_epsilon``; a config whose
``distillation_objective`` is not ``"iw_opd"`` (TRL's JSD objective:
:class:`~fastalign.integrations.trl.IWOPDJSDLoss`) is refused.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.advantages.token_level import iw_opd_terms
from fastalign.integrations.trl._config import read_fields

__all__ = ["IW_OPD_DEFAULTS", "IWOPDLoss"]

#: the ``IWOPDConfig`` fields the IW-OPD loss reads, with TRL 1.16's defaults
IW_OPD_DEFAULTS: Dict[str, Any] = dict(distillation_objective="iw_opd", iw_opd_gamma=0.5, iw_opd_epsilon=1e-8)


class IWOPDLoss(nn.Module):
    """``IWOPDTrainer``'s IW-OPD loss and metrics (TRL 1.16) from per-token log-probs (see the module doc):
    ``forward(logprobs, teacher_logprobs, completion_mask, rollout_logprobs=None, num_items_in_batch=None)``, each
    ``[B, T]`` over the completion tokens.

    Metrics (TRL's names, over the valid tokens; NaN where there is none, when TRL logs nothing):
    ``iw_opd/mean_advantage`` (of ``w a``), ``iw_opd/mean_abs_advantage`` (of ``|a|``), ``iw_opd/mean_weight``,
    ``iw_opd/min_weight`` and ``iw_opd/max_weight``.

    TRL raises where a valid token's teacher log-prob is not finite (the teacher server left it out); so does the
    profile (``ValueError`` naming ``teacher_logprobs``) where the values are on the host (an eager CPU tensor);
    elsewhere they are not read (that would synchronise) and the loss is not finite."""

    def __init__(self, config=None):
        super().__init__()
        c = read_fields(config, IW_OPD_DEFAULTS, "IWOPDConfig")
        if c["distillation_objective"] != "iw_opd":
            raise ValueError(f"IWOPDConfig.distillation_objective={c['distillation_objective']!r}: IWOPDLoss is the "
                             "'iw_opd' objective; the 'jsd' one is IWOPDJSDLoss")
        self.gamma = _validate.finite_number("IWOPDConfig.iw_opd_gamma", c["iw_opd_gamma"])
        self.eps = _validate.positive("IWOPDConfig.iw_opd_epsilon", c["iw_opd_epsilon"])

    def forward(self, logprobs: Tensor, teacher_logprobs: Tensor, completion_mask: Tensor,
                rollout_logprobs: Optional[Tensor] = None, num_items_in_batch=None):
        _validate.any_float("logprobs", logprobs, dim=2)
        _validate.like(tuple(logprobs.shape), "like logprobs", device=logprobs.device, device_of="logprobs",
                       required=True, teacher_logprobs=teacher_logprobs)
        valid = completion_mask != 0
        missing = valid & ~torch.isfinite(teacher_logprobs)
        _validate.flag_or_raise(missing.any(), teacher_logprobs, lambda: (
            f"teacher_logprobs are missing (not finite) at {int(missing.sum())} of {int(valid.sum())} completion "
            "tokens; IW-OPD needs the teacher's log-prob of every one"))  # on a GPU: not read, a non-finite loss
        rollout = logprobs.detach() if rollout_logprobs is None else rollout_logprobs
        a, w = iw_opd_terms(teacher_logprobs, rollout, completion_mask, self.gamma, self.eps)
        advantages = w * a
        n = valid.sum()
        lp = logprobs if logprobs.dtype == torch.float64 else logprobs.float()  # the sum in fp32 at least
        loss = -torch.where(valid, lp * advantages.to(lp.dtype), 0.0).sum()
        if num_items_in_batch is None:
            loss = loss / n.clamp(min=1)
        else:
            if not isinstance(num_items_in_batch, (int, float, Tensor)) or isinstance(num_items_in_batch, bool):
                raise TypeError(f"num_items_in_batch must be a number or a tensor, got "
                                f"{type(num_items_in_batch).__name__}")
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)

        def over_valid(x, reduce, fill):  # NaN without a valid token (TRL logs nothing then)
            value = reduce(torch.where(valid, x, fill).reshape(-1)) if x.numel() else x.new_zeros(())
            return torch.where(n > 0, value, float("nan"))

        metrics = {"iw_opd/mean_advantage": over_valid(advantages, torch.sum, 0.0) / n.clamp(min=1),
                   "iw_opd/mean_abs_advantage": over_valid(a.abs(), torch.sum, 0.0) / n.clamp(min=1),
                   "iw_opd/mean_weight": over_valid(w, torch.sum, 0.0) / n.clamp(min=1),
                   "iw_opd/min_weight": over_valid(w, torch.amin, float("inf")),
                   "iw_opd/max_weight": over_valid(w, torch.amax, float("-inf"))}
        return loss, metrics
