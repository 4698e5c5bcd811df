"""``RLOOTrainer``: TRL 1.16's ``trl.RLOOTrainer`` with its log-probs, entropies and loss in fastalign.

Same constructor, same ``trl.RLOOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import RLOOTrainer   # was: from trl import RLOOTrainer

Per-token log-probs and entropies of the policy (and of the reference and old policy) come from
the last hidden states and the model's own output head, so the ``[B, T, V]`` logits are never built; the
old policy's and the reference's, without gradients, through the training loss's own pass
(:func:`fastalign.linear_policy.policy_logprobs`), so an on-policy ratio is exactly 1 as in TRL;
the training loss goes through the head itself (:func:`fastalign.linear_policy.policy_step`: one
pass over blocks of whole completions, three matrix products instead of four); the loss is :class:`fastalign.integrations.trl.RLOOLoss` of the trainer's config, and the metrics
go through TRL's own ``_metrics`` under TRL's names (``entropy`` weighted by every process's
tokens, ``clip_ratio/*`` over every process's completions, as TRL gathers them). Generation,
rewards and advantages are TRL's.

Options the drop-in cannot honour raise a ValueError naming the config field at construction:
``use_liger_kernel`` and an architecture without a known head transform; a float64 policy or reference raises a
TypeError there (the fused head runs in float32, bfloat16 or float16, or in the bf16 / fp16 of mixed precision).
The clip range TRL reads from the trainer at every step (``epsilon_low``, ``epsilon_high``) is read here too, so
an assignment takes effect at the next step. A MoE model's load-balancing loss (``router_aux_loss_coef`` with
``output_router_logits``) comes from the router logits of the same body forward, as TRL adds it.
"""
from __future__ import annotations

import functools

import torch
import trl

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import (add_aux_loss, fused_logps_and_entropies, head_policy_loss,
                                              install_heads)
from fastalign.integrations.trl._live_loss import LiveLoss, build_loss
from fastalign.integrations.trl._metrics import reduced_metric
from fastalign.integrations.trl._vision import batch_vision
from fastalign.integrations.trl.rloo import RLOOLoss

__all__ = ["RLOOTrainer"]

#: The metrics that are a min / max over every process's completions; the others are means.
_PER_PROCESS = {"clip_ratio/low_min": torch.amin, "clip_ratio/high_max": torch.amax}


class RLOOTrainer(trl.RLOOTrainer):
    """``trl.RLOOTrainer`` with fastalign's fused log-probs, entropies and loss (see the module doc)."""

    #: the options TRL's ``_compute_loss`` reads from the trainer at every step -> their ``RLOOConfig`` fields
    fastalign_loss = LiveLoss(RLOOLoss, {"epsilon_low": "epsilon", "epsilon_high": "epsilon_high"})

    @functools.wraps(trl.RLOOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, trl.RLOOTrainer.__init__, args, kwargs, lambda config: check_config(config, "RLOOConfig"))
        check_model(self, "RLOOConfig")
        build_loss(self)
        install_heads(self, temperature=self.temperature)

    _get_per_token_logps_and_entropies = fused_logps_and_entropies

    def _policy_pass(self) -> bool:
        """The loss's pass through the head (its ``token_separable``: False, the ratio is per completion), which the
        old policy's log-probs take too, so an on-policy ratio is exactly 1 (:func:`fused_logps_and_entropies`)."""
        return False

    def _compute_loss(self, model, inputs):
        """TRL's ``_compute_loss`` contract: the micro-batch loss; the metrics go to ``self._metrics``."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        vision = batch_vision(inputs)
        rloo_loss = self.fastalign_loss  # the options assigned since the last step, checked

        def rloo(per_token_logps, _old, entropies):  # the old policy's log-probs are per completion: inputs'
            return rloo_loss(per_token_logps, inputs["old_logps"], inputs["advantages"], completion_mask,
                             entropy=entropies)

        loss, metrics, _, aux_loss = head_policy_loss(self, model, ids, attention, completion_ids, completion_mask,
                                                      None, rloo, vision)
        mode = "train" if self.model.training else "eval"
        loss = add_aux_loss(self, loss, aux_loss, mode)  # the MoE load-balancing loss of the same forward
        log = self._metrics[mode]
        rows = completion_mask.size(0)
        for name, value in metrics.items():  # entropy: over every process's tokens; clip means: over its completions
            count = completion_mask.sum() if name == "entropy" else rows
            log[name].append(reduced_metric(self.accelerator, value, count, _PER_PROCESS.get(name)))
        return loss
