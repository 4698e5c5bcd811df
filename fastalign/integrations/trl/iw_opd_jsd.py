r"""TRL 1.16 ``IWOPDTrainer`` profile, ``distillation_objective="jsd"`` with a local teacher: the generalized JSD
over the full vocabulary or over a support of top-k tokens, from both models' hidden states and heads.

Per completion token ``t`` (``loss_mask``), the support ``S_t`` by ``loss_top_k`` (``k``) and ``beta``:

* ``k = 0``, or ``k >= V`` outside the top-1 case: the whole vocabulary (:func:`fastalign.linear_divergence_loss`);
* ``beta > 0`` and ``k = 1``: the teacher's top-1 id and the reverse id (the sampled token; the student's top-1
  with ``reverse_kl_top_1_mode="argmax"``), once if they are equal; at ``beta = 1`` the reverse id alone;
* otherwise the teacher's top-k at ``beta = 0``, the student's at ``beta = 1``, their union in between (a student
  id already among the teacher's counted once);

both models' log-probs over ``S_t`` at ``temperature`` (:func:`fastalign.linear_topk_logprobs`), renormalised over
it or, with ``loss_add_tail``, with one more category for the mass outside it; then the generalized JSD at
``beta`` (0 the forward KL, 1 the reverse KL), summed over the tokens and divided by ``num_items_in_batch`` when
given, else by the token count (at least 1). Neither model's logits are built, and the teacher's vocabulary is
passed over once at most: with the tail bucket, the pass that finds its top ids also normalises its log-probs at
the support (a union's renormalised ones, K dot products, are shifted at the teacher's top-1).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign._options import check_choice
from fastalign.aggregate import global_divisor
from fastalign.integrations.trl._config import read_fields
from fastalign.integrations.trl._head import trl_global_tokens
from fastalign.integrations.trl._support import on_support, support_divergence
from fastalign.linear_divergence import linear_divergence_loss
from fastalign.linear_topk import linear_topk_logprobs

__all__ = ["IW_OPD_JSD_DEFAULTS", "IWOPDJSDLoss"]

#: the ``IWOPDConfig`` fields the JSD objective reads, with TRL 1.16's defaults
IW_OPD_JSD_DEFAULTS: Dict[str, Any] = dict(distillation_objective="jsd", beta=1.0, temperature=1.0, loss_top_k=1,
                                           loss_add_tail=True, reverse_kl_top_1_mode="sampled")


class IWOPDJSDLoss(nn.Module):
    """``IWOPDTrainer``'s JSD objective (TRL 1.16) from an ``IWOPDConfig`` or a dict of its fields (see the module
    doc): ``linear(hidden, weight, teacher_hidden, teacher_weight, completion_ids, loss_mask,
    num_items_in_batch=None, *, bias=None, teacher_bias=None, **head)`` returns the loss."""

    def __init__(self, config=None):
        super().__init__()
        c = read_fields(config, IW_OPD_JSD_DEFAULTS, "IWOPDConfig")
        if c["distillation_objective"] != "jsd":
            raise ValueError(f"IWOPDConfig.distillation_objective={c['distillation_objective']!r}: IWOPDJSDLoss is "
                             "the 'jsd' objective; 'iw_opd' is IWOPDLoss")
        self.beta = _validate.unit_interval("IWOPDConfig.beta", c["beta"])
        self.temperature = _validate.positive("IWOPDConfig.temperature", c["temperature"])
        self.top_k = _validate.at_least("IWOPDConfig.loss_top_k", c["loss_top_k"], 0)
        self.add_tail = _validate.boolean("IWOPDConfig.loss_add_tail", c["loss_add_tail"])
        self.reverse = c["reverse_kl_top_1_mode"]
        check_choice("IWOPDConfig.reverse_kl_top_1_mode", self.reverse, ("sampled", "argmax"))
        if self.reverse == "argmax" and not (self.beta > 0 and self.top_k == 1):
            raise ValueError("IWOPDConfig.reverse_kl_top_1_mode='argmax' applies only when beta > 0 and "
                             f"loss_top_k == 1 (got beta={self.beta}, loss_top_k={self.top_k})")

    def linear(self, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
               completion_ids: Tensor, loss_mask: Tensor, num_items_in_batch=None, *, bias: Optional[Tensor] = None,
               teacher_bias: Optional[Tensor] = None, **head) -> Tensor:
        """The loss from the hidden states ``[B, T, H]`` that predict ``completion_ids [B, T]`` (the sampled
        tokens), the heads (the teacher's tensors get no gradient) and the mask of the scored tokens. ``head``:
        ``logit_scale``, ``softcap``, ``teacher_logit_scale``, ``teacher_softcap``."""
        global_tokens = trl_global_tokens(num_items_in_batch, hidden.device)
        top_1 = self.beta > 0 and self.top_k == 1
        if not top_1 and not 0 < self.top_k < weight.shape[0]:
            return linear_divergence_loss(hidden, weight, teacher_hidden, teacher_weight, beta=self.beta,
                                          temperature=self.temperature, bias=bias, teacher_bias=teacher_bias,
                                          response_mask=loss_mask, global_tokens=global_tokens, **head)[0]
        _validate.integer("completion_ids", completion_ids)
        common = dict(temperature=self.temperature, response_mask=loss_mask)
        student = dict(bias=bias, **common, **{k: head[k] for k in ("logit_scale", "softcap") if k in head})
        teacher = dict(bias=teacher_bias, **common,
                       **{k[len("teacher_"):]: v for k, v in head.items() if k.startswith("teacher_")})
        support, mask, teacher_top = self._support(hidden, weight, teacher_hidden, teacher_weight, completion_ids,
                                                   student, teacher)
        # without the tail bucket only the support's logits count (a support given: K dot products per token)
        renormalize = not self.add_tail
        if support is None:  # the student's own top-k, with its log-probs there
            s = linear_topk_logprobs(hidden, weight, self.top_k, renormalize=renormalize, **student)
            s_lp, support = s.logprobs, s.ids
        else:
            s_lp = linear_topk_logprobs(hidden, weight, ids=support, renormalize=renormalize, **student).logprobs
        # with the tail, the teacher's vocabulary log-probs come from the pass that found its top ids: as they are
        # where the support is those ids, else the support's renormalised ones (K dot products) shifted by
        # lse_S - lse, read at the support's first id (the teacher's top-1)
        shifted = teacher_top is not None and not renormalize
        with torch.no_grad():
            if shifted and support is teacher_top.ids:
                t_lp = teacher_top.logprobs
            else:
                t_lp = linear_topk_logprobs(teacher_hidden, teacher_weight, ids=support,
                                            renormalize=renormalize or shifted, **teacher).logprobs
                if shifted:
                    t_lp = t_lp + (teacher_top.logprobs[..., :1] - t_lp[..., :1])
        s_lp, categories = on_support(s_lp, mask, self.add_tail)
        t_lp, _ = on_support(t_lp, mask, self.add_tail)
        per_token = support_divergence(s_lp, t_lp, self.beta, categories)
        valid = loss_mask != 0
        total = torch.where(valid, per_token, 0.0).sum()
        # TRL's clamped count: 0 divides as 1; a bad count not read on the host makes the loss NaN
        return total / (valid.sum().clamp(min=1) if global_tokens is None else global_divisor(global_tokens, total))

    def _support(self, hidden, weight, teacher_hidden, teacher_weight, completion_ids, student: dict,
                 teacher: dict) -> tuple:
        """``(ids [B, T, K], mask or None, teacher top or None)`` of each token's support (module doc), where the
        support starts with the teacher's own top ids, their :class:`fastalign.TopKSupport` (log-probs over the
        vocabulary) comes third; ``(None, None, None)`` for the student's own top-k, taken with its log-probs."""
        k = self.top_k
        with torch.no_grad():
            if self.beta > 0 and k == 1:
                reverse = completion_ids if self.reverse == "sampled" else \
                    linear_topk_logprobs(hidden, weight, 1, **student).ids[..., 0]
                if self.beta == 1:
                    return reverse[..., None], None, None
                first = linear_topk_logprobs(teacher_hidden, teacher_weight, 1, **teacher)
                return (torch.stack([first.ids[..., 0], reverse], -1),
                        torch.stack([torch.ones_like(reverse, dtype=torch.bool), reverse != first.ids[..., 0]], -1),
                        first)
            if self.beta == 1:
                return None, None, None
            teacher_top = linear_topk_logprobs(teacher_hidden, teacher_weight, k, **teacher)
            if self.beta == 0:
                return teacher_top.ids, None, teacher_top
            student_top = linear_topk_logprobs(hidden, weight, k, **student).ids
            seen = (student_top[..., :, None] == teacher_top.ids[..., None, :]).any(-1)
            return (torch.cat([teacher_top.ids, student_top], -1),
                    torch.cat([torch.ones_like(teacher_top.ids, dtype=torch.bool), ~seen], -1), teacher_top)
