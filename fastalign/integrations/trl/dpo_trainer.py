"""``DPOTrainer``: TRL 1.16's ``trl.DPOTrainer`` with its log-probs and loss in fastalign.

Same constructor, same ``trl.DPOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import DPOTrainer   # was: from trl import DPOTrainer

The chosen and rejected log-probs of the policy and of the reference (live or precomputed) come
from the last hidden states and the model's own output head, so the ``[B, T, V]`` logits are never
built; the loss is :class:`fastalign.integrations.trl.DPOLoss` of the trainer's config (every loss
type, loss weights, f-divergences, LD-DPO, WPO weighting). The training loss goes through the head
itself (:func:`fastalign.linear_step.separable_step`): one pass over blocks of whole pairs,
three matrix products instead of four, unless the loss couples the pairs (``aot``, ``aot_unpaired``;
WPO weights with ``sft``), which take the two passes. Metrics go through TRL's own ``_metrics``
under TRL's names: ``rewards/*`` and ``logps/*`` from the loss, and ``entropy``, ``num_tokens``,
``logits/chosen``, ``logits/rejected`` (the mean logit over the completion positions, from one
``H``-vector; a softcapped head's by one more vocabulary pass without gradients over those positions) and
``mean_token_accuracy`` from the same pass.

A MoE model's load-balancing loss (``router_aux_loss_coef`` with ``output_router_logits``) comes
from the router logits of the policy's body forward, as TRL adds it. Options the drop-in cannot
honour raise a ValueError naming the config field at construction: ``use_liger_kernel`` and
an architecture without a known head transform; a float64 policy or reference raises a TypeError there (the
fused head runs in float32, bfloat16 or float16, or in the bf16 / fp16 of mixed precision). With several
processes every metric is over the pairs (or tokens) of every process, as TRL gathers them.

The loss options TRL's trainer reads from its attributes at every step (``beta``, ``loss_types``,
``loss_weights``, ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``, ``ld_alpha``,
``use_weighting``) are read here too: ``trainer.beta = 0.5`` between steps (a schedule, a callback) changes the
loss from the next step, as in TRL, and a value the loss refuses raises there, naming the attribute. So does
``args.discopop_tau``, which TRL's loss reads from its config at every step.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import trl
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import (add_aux_loss, head_call, head_separable_loss,
                                              install_head, install_heads, policy_operands)
from fastalign.integrations.trl._live_loss import LiveLoss, build_loss
from fastalign.integrations.trl._metrics import gathered_mean, log_num_tokens, log_pair_metrics, token_mean
from fastalign.integrations.trl.preference import DPOLoss
from fastalign.linear_preference import coupling
from fastalign.sequence import sequence_logprobs

__all__ = ["DPOTrainer"]

_NOT_MODEL_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


class DPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` with fastalign's fused log-probs and loss (see the module doc)."""

    #: the options TRL's ``_compute_loss`` reads from the trainer at every step -> their ``DPOConfig`` fields, and
    #: (``args``) the config fields it reads from ``self.args`` at every step
    fastalign_loss = LiveLoss(DPOLoss, {"beta": "beta", "loss_types": "loss_type", "loss_weights": "loss_weights",
                                        "label_smoothing": "label_smoothing", "f_divergence_type": "f_divergence_type",
                                        "f_alpha_divergence_coef": "f_alpha_divergence_coef",
                                        "ld_alpha": "ld_alpha", "use_weighting": "use_weighting"},
                              args=("discopop_tau",))

    @functools.wraps(trl.DPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, trl.DPOTrainer.__init__, args, kwargs, self._check_config)
        check_model(self, "DPOConfig")
        build_loss(self)
        install_heads(self)

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "DPOConfig")
        DPOLoss(args)  # raises on an option mix the profile does not map

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's pass of the reference over ``dataset`` (``precompute_ref_log_probs``, inside ``__init__``), after
        the model checks: a refused model raises before the pass, not after it."""
        check_model(self, "DPOConfig")
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        """The reference's summed (LD-DPO weighted) completion log-probs: ``(chosen [B], rejected [B])``."""
        install_head(self.accelerator.unwrap_model(model))  # the precomputed reference runs inside __init__
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        shift_mask = inputs["completion_mask"][..., 1:]
        adapter = contextlib.nullcontext()
        if self.ref_model is None and hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            ref = model(**model_kwargs, labels=labels, **head_call(self, ("log_probs",))).log_probs
        ref = ref[:, -shift_mask.size(1):]
        return sequence_logprobs(ref, shift_mask, ld_alpha=self.ld_alpha).sum.chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        dpo_loss = self.fastalign_loss  # first: the options assigned since the last step, checked
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        shift_mask = inputs["completion_mask"][..., 1:]
        targets = inputs["input_ids"][:, 1:].masked_fill(shift_mask == 0, -100)
        # the policy's forward (its dropout draws) before the reference's, as in TRL
        policy = policy_operands(self, model, **model_kwargs)
        ref = {}
        if self.precompute_ref_logps:
            ref.update(ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"])
        else:
            ref["ref_chosen_logps"], ref["ref_rejected_logps"] = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs)

        # ipo and sigmoid_norm divide by TRL's unshifted completion count (one more than the scored tokens
        # when a completion starts at position 0: an empty prompt, keep_end truncation)
        lengths = inputs["completion_mask"].sum(1)

        def dpo(per_token_logps, sum_p2):
            log_sum_sq = None if sum_p2 is None else sum_p2.clamp(min=1e-38).log()
            return dpo_loss(per_token_logps, shift_mask, **ref, log_sum_sq_probs=log_sum_sq, lengths=lengths)

        unwrapped = self.accelerator.unwrap_model(self.model)
        weighted = dpo_loss.use_weighting
        loss, metrics, stats = head_separable_loss(
            policy.operands, unwrapped.config, targets, dpo, sum_p2=weighted, extras=("entropy", "argmax"),
            separable=coupling(dpo_loss.options["loss_type"], weighted) is None,
            position_means="scored")
        loss = add_aux_loss(self, loss, policy.aux_loss, mode)
        self._log_head_metrics(mode, stats, targets, inputs["attention_mask"])
        pairs = shift_mask.size(0) // 2
        for name, value in metrics.items():  # per-pair means: over every process's pairs, as TRL gathers them
            self._metrics[mode][name].append(gathered_mean(self.accelerator, value, pairs))
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_head_metrics(self, mode, stats, targets, attention_mask) -> None:
        """TRL's ``entropy``, ``num_tokens``, ``logits/*`` and ``mean_token_accuracy``: token-weighted over
        every process (sums and counts gathered, as TRL does), from the statistics of the loss's own pass."""
        self._metrics[mode]["entropy"].append(token_mean(self.accelerator, stats["entropy"], targets != -100))
        log_num_tokens(self, mode, attention_mask)
        log_pair_metrics(self, mode, stats, targets)
