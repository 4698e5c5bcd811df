"""``A2POTrainer``: TRL 1.16's experimental ``A2POTrainer`` (A*-PO) with its sequence log-probs computed by
fastalign.

Same constructor, same ``A2POConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import A2POTrainer   # was: from trl.experimental.a2po import A2POTrainer

A*-PO regresses ``beta2 (s - s_ref)`` on ``r - V*`` (:mod:`fastalign.integrations.trl.a2po` has the formulas),
with ``s`` the completion's summed log-probs. TRL's ``_get_sequence_logps`` builds the policy's (and the
reference's) ``[B, K, V]`` logits for them; here ``compute_loss`` runs the body and takes the loss through the
model's own output head in one pass over blocks of whole rows (the loss is a mean of per-row terms:
:func:`fastalign.linear_step.separable_step` with :class:`~fastalign.integrations.trl.A2POLoss`), and the reference's
``s_ref`` comes from its hidden states too (:meth:`A2POTrainer._get_sequence_logps`), at temperature 1 as TRL,
only the completion tokens under the attention mask going through the vocabulary. Stage 1 (the offline ``V*``
from the reference's samples), the generation, the rewards and TRL's ``implicit_reward`` / ``advantage`` metrics
stay TRL's.

Refused at construction, each naming the argument: ``use_liger_kernel``, PEFT
prompt learning, an architecture without a known head transform and a float64 model (the head runs in
float32, bfloat16 or float16).
"""
from __future__ import annotations

import functools

from torch import Tensor
from trl.experimental.a2po import A2POTrainer as _TRLA2POTrainer

from fastalign.integrations.hf import next_token_targets
from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import base_model, head_call, head_separable_loss, install_head
from fastalign.integrations.trl.a2po import A2POLoss

__all__ = ["A2POTrainer"]


class A2POTrainer(_TRLA2POTrainer):
    """TRL's experimental ``A2POTrainer`` whose sequence log-probs come from the hidden states (see the module
    doc)."""

    @functools.wraps(_TRLA2POTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, _TRLA2POTrainer.__init__, args, kwargs, lambda config: check_config(config, "A2POConfig"))
        check_model(self, "A2POConfig")
        install_head(self.accelerator.unwrap_model(self.model))
        install_head(self.accelerator.unwrap_model(self.ref_model))

    def _get_sequence_logps(self, model, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int) -> Tensor:
        """``[B]``: the summed log-probs of the last ``logits_to_keep`` tokens under ``attention_mask``, as TRL's."""
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    labels=_completion_labels(input_ids, attention_mask, logits_to_keep),
                    **head_call(self, ("log_probs",)))
        return out.log_probs.sum(dim=1)  # 0 at every position not scored

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        targets = next_token_targets(ids, labels=_completion_labels(ids, attention, inputs["logits_to_keep"]))
        operands = model(input_ids=ids, attention_mask=attention, **head_call(self, ("operands",))).operands
        a2po, mask = A2POLoss(self.args), targets != -100

        def rows(per_token_logps, _sum_p2):  # a mean of per-row terms: one pass over blocks of rows
            return a2po(per_token_logps, mask, inputs["ref_logps"], inputs["rewards"], inputs["v_star"])

        loss, metrics, _ = head_separable_loss(operands, base_model(self, model).config, targets, rows, items="rows")
        for name in ("implicit_reward", "advantage"):
            self._metrics[mode][name].append(metrics[name].item())
        return loss


def _completion_labels(input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int) -> Tensor:
    """The last ``logits_to_keep`` tokens under the attention mask, -100 elsewhere (TRL's completion mask)."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    return labels
