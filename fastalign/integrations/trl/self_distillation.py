r"""TRL 1.16 ``SDPOTrainer`` / ``SDFTTrainer`` profile (``trl.experimental.sdpo`` / ``.sdft``): self-distillation.

Both trainers distil a teacher (the model itself, shown a privileged context) into the student on the student's
own completions. Per completion token of the distilled samples (``m``, TRL's ``loss_mask``), with the student's
and the teacher's distributions at the config's ``temperature`` and ``lp`` / ``lt`` their log-probs of the sampled
token:

* ``distillation_mode="sampled_token"`` (SDPO's default; ``distillation_alpha`` must be 1):
  ``L_t = sg(lp_t - lt_t) lp_t``, the reverse KL's score-function estimate on the sampled token;
* ``"full_logits"``: ``L_t`` the generalized JSD at ``alpha = distillation_alpha`` over the vocabulary (0 the
  forward KL, 1 the reverse KL; :func:`fastalign.linear_divergence_loss`'s ``beta``);
* ``"topk_logits"`` (SDFT's default): the same JSD over the student's ``distillation_topk`` largest logits
  ``S_t``, both models' log-probs there (:func:`fastalign.linear_topk_logprobs`), renormalised over ``S_t``
  (``lp_j - logsumexp_{S_t} lp``), or with ``distillation_add_tail`` one more category for the rest of the
  mass, ``log(1 - exp(min(logsumexp_{S_t} lp, -1e-7)))``;

times the clipped importance ratio ``w_t = sg(min(exp(clamp(lp_t - old_t, -20, 20)), distillation_is_clip))``
when ``distillation_is_clip`` is set and the rollout's log-probs ``old`` are given, and

.. math:: \text{loss} = \operatorname{mean}_b \frac{\sum_t m_{bt} w_{bt} L_{bt}}{\max(\sum_t m_{bt}, 1)}

(an empty row adds 0 and counts). The metric ``self_distillation/distillation_loss`` is the token mean of
``m w L``.

:meth:`SelfDistillationLoss.forward` takes per-token log-probs (``sampled_token``);
:meth:`SelfDistillationLoss.linear` takes both models' hidden states and heads (every mode; the logits of
neither are built: ``full_logits`` is :func:`fastalign.linear_divergence_loss` with the ratios as
``token_weights`` and ``agg="seq-mean-token-mean"``, ``topk_logits`` the divergence above on
:func:`fastalign.linear_topk_logprobs`'s ``[B, T, k]`` log-probs).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.integrations.trl._config import read_fields
from fastalign.integrations.trl._support import on_support, support_divergence
from fastalign.linear import linear_logprobs
from fastalign.linear_divergence import linear_divergence_loss
from fastalign.linear_topk import linear_topk_logprobs

__all__ = ["SDPO_DEFAULTS", "SDFT_DEFAULTS", "SelfDistillationLoss"]

#: the ``SDPOConfig`` / ``SDFTConfig`` fields the self-distillation loss reads, with TRL 1.16's defaults
SDPO_DEFAULTS: Dict[str, Any] = dict(temperature=1.0, distillation_mode="sampled_token", distillation_alpha=1.0,
                                     distillation_is_clip=2.0, distillation_topk=None, distillation_add_tail=False)
SDFT_DEFAULTS: Dict[str, Any] = dict(temperature=1.0, distillation_mode="topk_logits", distillation_alpha=0.5,
                                     distillation_is_clip=2.0, distillation_topk=100, distillation_add_tail=False)
_MODES = ("sampled_token", "full_logits", "topk_logits")
_METRIC = "self_distillation/distillation_loss"


def _clipped_ratio(logprobs: Tensor, old_logprobs: Tensor, clip: float) -> Tensor:
    """TRL's importance weight ``min(exp(clamp(lp - old, -20, 20)), clip)``, detached."""
    return torch.exp((logprobs.detach() - old_logprobs.detach()).clamp(-20.0, 20.0)).clamp(max=clip)


class SelfDistillationLoss(nn.Module):
    """The self-distillation loss of TRL 1.16's ``SDPOTrainer`` and ``SDFTTrainer`` from their config (an
    ``SDPOConfig`` / ``SDFTConfig`` object, or a dict with ``SDPOConfig``'s fields; see the module doc).
    Returns ``(loss, metrics)``, the metric under TRL's name.

    ``config_name`` (``"SDPOConfig"`` or ``"SDFTConfig"``): the config whose defaults fill the fields ``config``
    lacks and whose name the errors carry; by default ``"SDFTConfig"`` for an ``SDFTConfig`` object, else
    ``"SDPOConfig"``."""

    def __init__(self, config=None, *, config_name: Optional[str] = None):
        super().__init__()
        name = config_name or ("SDFTConfig" if type(config).__name__ == "SDFTConfig" else "SDPOConfig")
        if name not in ("SDPOConfig", "SDFTConfig"):
            raise ValueError(f"config_name must be 'SDPOConfig' or 'SDFTConfig', got {name!r}")
        c = read_fields(config, SDFT_DEFAULTS if name == "SDFTConfig" else SDPO_DEFAULTS, name)
        self.config_name = name
        self.mode = c["distillation_mode"]
        if self.mode not in _MODES:
            raise ValueError(f"{name}.distillation_mode must be one of {_MODES}, got {self.mode!r}")
        self.topk = None
        if self.mode == "topk_logits":
            if c["distillation_topk"] is None:
                raise ValueError(f"{name}.distillation_topk must be set for distillation_mode='topk_logits'")
            self.topk = _validate.at_least(f"{name}.distillation_topk", c["distillation_topk"])
        self.add_tail = _validate.boolean(f"{name}.distillation_add_tail", c["distillation_add_tail"])
        self.alpha = _validate.unit_interval(f"{name}.distillation_alpha", c["distillation_alpha"])
        if self.mode == "sampled_token" and self.alpha != 1.0:
            raise ValueError(f"{name}.distillation_alpha={self.alpha}: distillation_mode='sampled_token' is the "
                             "reverse KL only (alpha = 1), as TRL requires")
        clip = c["distillation_is_clip"]
        self.is_clip = None if clip is None else _validate.positive(f"{name}.distillation_is_clip", clip)
        self.temperature = _validate.positive(f"{name}.temperature", c["temperature"])

    def _weights(self, logprobs: Tensor, old_logprobs: Optional[Tensor]) -> Optional[Tensor]:
        if self.is_clip is None or old_logprobs is None:
            return None
        _validate.any_float("old_logprobs", old_logprobs)
        _validate.shape("old_logprobs", old_logprobs, tuple(logprobs.shape), "like the completion tokens")
        return _clipped_ratio(logprobs, old_logprobs, self.is_clip)

    def forward(self, logprobs: Tensor, teacher_logprobs: Tensor, loss_mask: Tensor,
                old_logprobs: Optional[Tensor] = None):
        """``sampled_token`` from the student's log-probs ``[B, T]`` of the sampled completion tokens at the
        temperature (differentiable), the teacher's (constants), the loss mask and, for the importance ratio, the
        rollout's log-probs."""
        if self.mode != "sampled_token":
            raise ValueError(f"distillation_mode={self.mode!r} compares distributions: use .linear() with both "
                             "models' hidden states and heads")
        _validate.any_float("logprobs", logprobs, dim=2)
        _validate.like(tuple(logprobs.shape), "like logprobs", required=True, device=logprobs.device,
                       device_of="logprobs", teacher_logprobs=teacher_logprobs)
        _validate.like(tuple(logprobs.shape), "like logprobs", kind="real", required=True, device=logprobs.device,
                       device_of="logprobs", loss_mask=loss_mask)
        lp = logprobs if logprobs.dtype == torch.float64 else logprobs.float()
        per_token = (lp - teacher_logprobs.to(lp.dtype)).detach() * lp
        return self._reduced(per_token, self._weights(lp, old_logprobs), loss_mask)

    @staticmethod
    def _reduced(per_token: Tensor, weights: Optional[Tensor], loss_mask: Tensor):
        """``(loss, metrics)`` from ``L [B, T]``: the row means of ``m w L`` over ``max(sum_t m, 1)``, averaged."""
        if weights is not None:
            per_token = per_token * weights.to(per_token.dtype)
        m = loss_mask.to(per_token.dtype)
        masked = torch.where(loss_mask != 0, per_token, 0.0) * m  # a masked token's NaN or inf adds nothing
        loss = (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).mean() if masked.shape[0] else masked.sum()
        return loss, {_METRIC: masked.detach().sum() / m.sum().clamp(min=1.0)}

    def linear(self, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
               completion_ids: Tensor, loss_mask: Tensor, old_logprobs: Optional[Tensor] = None, *,
               bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None, **head):
        """Either mode from the hidden states ``[B, T, H]`` that predict ``completion_ids [B, T]`` and the heads
        (the teacher's hidden size may differ; its tensors get no gradient), never the logits. ``head``: each
        side's ``logit_scale`` / ``softcap`` (``teacher_logit_scale``, ``teacher_softcap``) and ``backend``, as
        :func:`fastalign.linear_divergence_loss` takes them. ``full_logits`` with the importance ratio runs one
        more pass of the student's head without gradients, for the sampled tokens' log-probs."""
        _validate.integer("completion_ids", completion_ids)
        labels = completion_ids.masked_fill(loss_mask == 0, -100)
        student = {k: head[k] for k in ("logit_scale", "softcap", "backend") if k in head}
        teacher = {k[len("teacher_"):]: v for k, v in head.items() if k.startswith("teacher_")}
        if self.mode == "sampled_token":
            lp = linear_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature, **student).logprobs
            with torch.no_grad():
                lt = linear_logprobs(teacher_hidden, teacher_weight, labels, bias=teacher_bias,
                                     temperature=self.temperature, backend=head.get("backend"), **teacher).logprobs
            return self(lp, lt, loss_mask, old_logprobs)
        w = None
        if self.is_clip is not None and old_logprobs is not None:
            with torch.no_grad():
                lp = linear_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                     **student).logprobs
            w = self._weights(lp, old_logprobs)
        if self.mode == "topk_logits":
            return self._reduced(self._topk_divergence(hidden, weight, bias, teacher_hidden, teacher_weight,
                                                       teacher_bias, loss_mask, student, teacher), w, loss_mask)
        loss, metrics = linear_divergence_loss(
            hidden, weight, teacher_hidden, teacher_weight, beta=self.alpha, temperature=self.temperature,
            bias=bias, teacher_bias=teacher_bias, response_mask=loss_mask, token_weights=w,
            agg="seq-mean-token-mean", **head)
        return loss, {_METRIC: metrics["divergence"] if w is None else metrics["weighted_divergence"]}

    def _topk_divergence(self, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, loss_mask,
                         student: dict, teacher: dict) -> Tensor:
        """``L [B, T]`` of ``topk_logits``: the divergence over the student's top-k support (module doc)."""
        # without the tail bucket only the support's logits count: the teacher takes K dot products per token
        pipeline = dict(temperature=self.temperature, response_mask=loss_mask, renormalize=not self.add_tail)
        student = {k: v for k, v in student.items() if k != "backend"}  # the support has one path
        if self.topk > weight.shape[0]:
            raise ValueError(f"{self.config_name}.distillation_topk={self.topk} is larger than the vocabulary "
                             f"({weight.shape[0]} ids)")
        s = linear_topk_logprobs(hidden, weight, self.topk, bias=bias, **pipeline, **student)
        with torch.no_grad():
            t = linear_topk_logprobs(teacher_hidden, teacher_weight, ids=s.ids, bias=teacher_bias, **pipeline,
                                     **teacher).logprobs
        return support_divergence(on_support(s.logprobs, None, self.add_tail)[0], on_support(t, None, self.add_tail)[0],
                                  self.alpha)
