"""``A2POTrainer``: TRL 1.16's experimental ``A2POTrainer`` (A*-PO) with its sequence log-probs computed by
fastalign.

Same constructor, same ``A2POConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import A2POTrainer   # was: from trl.experimental.a2po import A2POTrainer

A*-PO regresses ``beta2 (s - s_ref)`` on ``r - V*`` (:mod:`fastalign.integrations.trl.a2po` has the formulas),
with ``s`` the completion's summed log-probs. TRL's ``_get_sequence_logps`` builds the policy's (and the
reference's) ``[B, K, V]`` logits for them; here it runs the body and takes the log-probs of the completion
tokens under the attention mask straight from the last hidden states and the model's own output head
(:func:`fastalign.integrations.hf.causal_lm_logprobs`'s head, at temperature 1 as TRL), so the logits are never
built and only the completion tokens go through the vocabulary. Stage 1 (the offline ``V*`` from the
reference's samples), the generation, the rewards, the loss and the logged metrics stay TRL's.

Refused at construction, each naming the argument: ``use_liger_kernel``, vision-language models, PEFT
prompt learning, an architecture without a known head transform and a float64 model (the head runs in
float32, bfloat16 or float16).
"""
from __future__ import annotations

import functools

from torch import Tensor
from trl.experimental.a2po import A2POTrainer as _TRLA2POTrainer

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import head_call, install_head

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
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    **head_call(self, ("log_probs",)))
        return out.log_probs.sum(dim=1)  # 0 at every position not scored
