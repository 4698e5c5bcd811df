"""``SFTTrainer``: TRL 1.16's ``trl.SFTTrainer`` with its token log-probs, entropy and accuracy in fastalign.

Same constructor, same ``trl.SFTConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import SFTTrainer   # was: from trl import SFTTrainer

The loss and its metrics come from the last hidden states and the model's own output head (only
positions whose next-token label is not -100 go through the vocabulary; the ``[B, T, V]`` logits
are never built), the training loss in one pass through the head over blocks of tokens
(:func:`fastalign.linear_step.separable_step`: three matrix products instead of four):

    nll:  loss = -Σ_t lp_t / N            dft:  loss = -Σ_t sg(p_t) lp_t / N

``N`` the scored-token count (``num_items_in_batch`` when ``Trainer`` passes it, then times the
process count with ``average_tokens_across_devices``), as TRL's ``compute_loss``. ``entropy``,
``mean_token_accuracy`` and ``num_tokens`` are logged under TRL's names, over every process's
tokens. Padded, packed (``padding_free``, ``position_ids``) and completion-only batches are scored
as TRL scores them: every position whose next-token label is not -100 (the collator's labels alone,
as the model's own loss: a collator that keeps labels on its padding has them scored).

``label_smoothing_factor`` ε (``loss_type="nll"``) adds TRL's smoothing term without the logits:
``(1-ε) NLL + ε mean_t (-(1/V) Σ_j log p_tj) = NLL + ε mean_t (z_ty - mean_j z_tj)``, the margin
linear in the hidden states (one head row per token); a softcapped head's label logit is one head row per token
too, and its mean logit a statistic of the loss's own pass, its gradient in the same backward (``mean_logit`` of
:func:`fastalign.linear_step.separable_step`: no pass of its own). As in TRL, ε is the one
``Trainer``'s constructor put in ``label_smoother``, for ``args.loss_type="nll"`` (with ``"dft"``, which TRL
runs without it, a ε > 0 raises a ``ValueError`` when the trainer is built). With it TRL runs a
second forward, without gradients, for the ``entropy``, ``mean_token_accuracy`` and ``aux_loss``
metrics, and leaves a MoE model's load-balancing loss out of the loss (logged, not added). In
training mode the drop-in runs that forward too, so the metrics come from the same dropout draw as
TRL's and every later draw (dropout, LoRA dropout) matches. It costs one more body forward and
vocabulary pass without gradients per micro-batch (about a third more compute per step), as in TRL;
in evaluation (no dropout: the second forward would repeat the first) the metrics come from the
loss's own pass.

Options the drop-in cannot honour raise a ValueError naming them at construction:
``compute_loss_func`` (it needs the full logits),
``use_liger_kernel``, sequence parallelism, an architecture without a known head transform and PEFT prompt learning (its
virtual tokens reach the body as ``inputs_embeds``; X-LoRA and ShadowPEFT too). A MoE model's load-balancing
loss comes from the router logits of the same body forward, as TRL adds it.
"""
from __future__ import annotations

import functools

import torch
import trl
from transformers.trainer_pt_utils import LabelSmoother

from fastalign.integrations.hf import head_transform, next_token_targets, packed_rows_refusal
from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import (add_aux_loss, head_separable_loss, install_head, label_logit,
                                              log_aux_loss, loss_and_outputs, policy_operands)

__all__ = ["SFTTrainer"]


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` with fastalign's fused log-probs, entropy and accuracy (see the module doc)."""

    @functools.wraps(trl.SFTTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, trl.SFTTrainer.__init__, args, kwargs, self._check_config)
        check_model(self, "SFTConfig")
        if self.compute_loss_func is not None:
            raise ValueError("compute_loss_func is not supported by the fastalign SFTTrainer: it takes the model's "
                             "logits, which the fused head never builds")
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise ValueError("sequence parallelism is not supported by the fastalign SFTTrainer")
        unwrapped = self.accelerator.unwrap_model(self.model)
        # padding_free (TRL's: or packing by bfd) rows: one row, with the flash-attention sequence keywords
        refusal = packed_rows_refusal(unwrapped, varlen=True) if self.padding_free else None
        if refusal is not None:
            raise ValueError(f"SFTConfig: padding_free=True (or packing=True with packing_strategy 'bfd' or "
                             f"'bfd_split') packs sequences into rows whose position_ids restart, but {refusal}; set "
                             "padding_free=False and packing=False (or packing_strategy='wrapped')")
        install_head(unwrapped)

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "SFTConfig")
        if args.label_smoothing_factor > 0 and args.loss_type != "nll":
            raise ValueError(f"SFTConfig.label_smoothing_factor applies to loss_type='nll' only (TRL ignores it with "
                             f"{args.loss_type!r}); set it to 0")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
        # TRL's label_mask: every label that is not -100 is scored, as the model's own loss scores it (TRL's
        # collators write -100 at padding and packed boundaries; a collator's labels on padding are scored)
        targets = next_token_targets(inputs["input_ids"], labels=inputs["labels"])
        scored = targets != -100
        num_tokens = torch.as_tensor(scored.sum() if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
        dft = self.args.loss_type == "dft"
        eps = self._smoothing()
        unwrapped = self.accelerator.unwrap_model(self.model)
        scale, softcap = head_transform(unwrapped.config)
        capped = eps > 0 and softcap is not None  # the mean logit from the loss's own pass

        def sft(per_token_logps, mean_logits):  # 0 at unscored positions; DFT weighs by the detached probability
            per_token_loss = -per_token_logps * (per_token_logps.detach().exp() if dft else 1.0)
            if mean_logits is not None:  # a softcapped head's smoothing: -eps mean_j z_tj, differentiable
                per_token_loss = per_token_loss - eps * mean_logits
            return per_token_loss.sum() / num_tokens, {}

        policy = policy_operands(self, model, **model_inputs)
        loss, _, stats = head_separable_loss(policy.operands, unwrapped.config, targets, sft, items="tokens",
                                             mean_logit=capped, extras=("entropy", "argmax"))
        aux = policy.aux_loss
        if eps > 0:  # (1 - eps) NLL + eps mean_t (lse_t - mean_j z_tj) = NLL + eps mean_t (z_ty - mean_j z_tj)
            margin = label_logit(policy.operands, targets, scale, softcap, minus_mean=not capped)
            loss = loss + eps * margin.sum() / num_tokens
            if self.model.training:  # TRL's second forward: its dropout draws, the metrics from it
                stats, aux = self._metrics_forward(model, model_inputs, targets)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if eps > 0:  # TRL logs the MoE load-balancing loss without adding it to the loss
            log_aux_loss(self, aux, mode)
        else:  # added, averaged over the accumulation steps as TRL's
            loss = add_aux_loss(self, loss, aux, mode,
                                scale=self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1)
        self._log_metrics(mode, inputs, stats, targets)
        return loss_and_outputs(loss, model, return_outputs, **model_inputs)

    def _smoothing(self) -> float:
        """The label-smoothing ε of this step, read as TRL reads it: the ``label_smoother`` that ``Trainer``'s
        constructor built from ``label_smoothing_factor`` (a later change of ``args.label_smoothing_factor`` leaves
        it as it is), applied while ``args.loss_type`` is ``"nll"``; 0 otherwise."""
        smoother = self.label_smoother
        if smoother is None or self.args.loss_type != "nll":
            return 0.0
        if not isinstance(smoother, LabelSmoother):
            raise ValueError(f"SFTTrainer.label_smoother: {type(smoother).__name__} takes the logits, which the fused "
                             "head never builds; the fastalign SFTTrainer applies transformers' LabelSmoother only")
        return smoother.epsilon

    def _metrics_forward(self, model, model_inputs, targets):
        """``(stats, aux_loss)`` of a second forward without gradients: what TRL's label-smoothing path logs
        ``entropy``, ``mean_token_accuracy`` and ``aux_loss`` from (``model(**inputs, fused_lm_head=True)``
        under ``no_grad``, after the loss's forward). With dropout active its draws differ from the loss's,
        and it advances the random stream as TRL's does, so the next step's masks match TRL's too."""
        with torch.no_grad():
            second = policy_operands(self, model, **model_inputs)
            _, _, stats = head_separable_loss(second.operands, self.accelerator.unwrap_model(self.model).config,
                                              targets, lambda lp, _sum_p2: (lp.sum(), {}), items="tokens",
                                              extras=("entropy", "argmax"))
        return stats, second.aux_loss

    def _log_metrics(self, mode, inputs, stats, targets) -> None:
        """TRL's ``entropy``, ``mean_token_accuracy`` (over every process's scored tokens) and ``num_tokens``,
        from ``stats``: the loss's own pass, or with label smoothing in training TRL's metrics forward."""
        gather = self.accelerator.gather_for_metrics
        log = self._metrics[mode]
        num_valid = gather((targets != -100).sum()).sum()
        entropy_sum = gather(stats["entropy"].sum()).sum()
        num_correct = gather((stats["argmax"] == targets).sum()).sum()
        log["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        log["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:  # padding-free: one packed row, its length per process
                ids = inputs["position_ids"]
                tokens = gather(torch.tensor(ids.size(1), device=ids.device)).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        log["num_tokens"] = [self._total_train_tokens]
