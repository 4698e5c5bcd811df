"""``TPOTrainer``: TRL 1.16's ``trl.experimental.tpo.TPOTrainer`` with its log-probs and loss in fastalign.

Same constructor, same ``TPOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import TPOTrainer   # was: from trl.experimental.tpo import TPOTrainer

Triple Preference Optimization scores a chosen, a rejected and a gold (``reference``) completion per prompt:
a reference-free pair loss of the chosen and rejected log-probs plus ``tpo_alpha`` times the gold
completions' NLL (:class:`fastalign.integrations.trl.TPOLoss`: sigmoid, hinge, ipo, tpo-l, label smoothing).
The log-probs come from the last hidden states and the model's own output head, so the ``[3B, T, V]`` logits
are never built, and the loss goes through the head itself in one pass over blocks of whole triples
(:func:`fastalign.linear_step.separable_step`; whole pairs when ``tpo_alpha = 0``, where TRL's batches hold no
gold rows). Metrics keep TRL's names and values: ``entropy`` (over every completion token, gold included),
``num_tokens``, ``logits/chosen`` / ``logits/rejected`` (TRL's mean logit over the completion positions,
from one ``H``-vector; a softcapped head's by one more vocabulary pass without gradients over those
positions), ``mean_token_accuracy``, ``rewards/*`` and ``logps/*``.

Options the drop-in cannot honour raise a ValueError naming the config field at construction:
``use_liger_kernel``, an architecture without a known head transform, label smoothing with hinge or ipo (TRL
ignores it); a float64 model raises a TypeError there (the fused head runs in float32, bfloat16 or float16, or
in the bf16 / fp16 of mixed precision). ``beta``, ``loss_type``, ``label_smoothing``, ``tpo_alpha`` and
``tpo_l_gamma`` assigned on the trainer take effect at the next step, as in TRL; ``tpo_alpha`` may not move
between 0 and another value (TRL's collator keeps or drops the gold rows at construction), which raises a
ValueError at the next step.
"""
from __future__ import annotations

import functools

import torch
from trl.experimental.tpo import TPOTrainer as _TRLTPOTrainer

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import head_call, head_separable_loss, install_heads
from fastalign.integrations.trl._live_loss import LiveLoss, build_loss
from fastalign.integrations.trl._metrics import gathered_mean, log_num_tokens, log_pair_metrics
from fastalign.integrations.trl.preference import TPOLoss

__all__ = ["TPOTrainer"]


class TPOTrainer(_TRLTPOTrainer):
    """``trl.experimental.tpo.TPOTrainer`` with fastalign's fused log-probs and loss (see the module doc)."""

    #: the options TRL's ``_compute_loss`` reads from the trainer at every step -> their ``TPOConfig`` fields
    fastalign_loss = LiveLoss(TPOLoss, {"beta": "beta", "loss_type": "loss_type", "label_smoothing": "label_smoothing",
                                        "tpo_alpha": "tpo_alpha", "tpo_l_gamma": "tpo_l_gamma"})

    @functools.wraps(_TRLTPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, _TRLTPOTrainer.__init__, args, kwargs, self._check_config)
        check_model(self, "TPOConfig")
        self._gold_rows = self.args.tpo_alpha != 0.0  # TRL's collator keeps the gold rows then
        build_loss(self)
        install_heads(self)

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "TPOConfig")
        TPOLoss(args)  # raises on an option the profile does not map (label smoothing TRL would ignore)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        tpo_loss = self.fastalign_loss  # the options assigned since the last step, checked
        if tpo_loss.gold != self._gold_rows:
            raise ValueError(f"TPOTrainer.tpo_alpha={self.tpo_alpha!r}: the batches "
                             f"{'hold' if self._gold_rows else 'hold no'} gold rows (the collator was built with "
                             f"tpo_alpha={self.args.tpo_alpha!r}); the gold NLL cannot be switched on or off after "
                             f"construction: build a new trainer")
        model_kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        shift_mask = inputs["completion_mask"][..., 1:]
        targets = inputs["input_ids"][:, 1:].masked_fill(shift_mask == 0, -100)
        policy = model(**model_kwargs, use_cache=False, **head_call(self, ("operands",)))
        unwrapped = self.accelerator.unwrap_model(self.model)
        loss, metrics, stats = head_separable_loss(
            policy.operands, unwrapped.config, targets, lambda lp, _sum_p2: tpo_loss(lp, shift_mask),
            items="triples" if tpo_loss.gold else "pairs", extras=("entropy", "argmax"),
            position_means="scored")
        self._log_head_metrics(mode, stats, targets, inputs["attention_mask"], tpo_loss.gold)
        pairs = shift_mask.size(0) // (3 if tpo_loss.gold else 2)
        for name, value in metrics.items():  # per-pair means: over every process's pairs, as TRL gathers them
            self._metrics[mode][name].append(gathered_mean(self.accelerator, value, pairs))
        if return_outputs:  # evaluation that predicts logits (compute_metrics)
            with torch.no_grad():
                outputs = model(**model_kwargs, use_cache=False)
            return loss, outputs
        return loss

    def _log_head_metrics(self, mode, stats, targets, attention_mask, gold: bool) -> None:
        """TRL's ``entropy`` (each process's mean over its completion tokens, averaged over processes),
        ``num_tokens``, ``logits/*`` and ``mean_token_accuracy`` (token-weighted over every process), from the
        statistics of the loss's own pass."""
        entropy = stats["entropy"][targets != -100].mean()
        self._metrics[mode]["entropy"].append(self.accelerator.gather_for_metrics(entropy).mean().item())
        log_num_tokens(self, mode, attention_mask)
        log_pair_metrics(self, mode, stats, targets, parts=3 if gold else 2)
