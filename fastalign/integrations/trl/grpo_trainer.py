"""``GRPOTrainer``: TRL 1.16's ``trl.GRPOTrainer`` with its log-probs, entropies and loss in fastalign.

Same constructor, same ``trl.GRPOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import GRPOTrainer   # was: from trl import GRPOTrainer

Per-token log-probs and entropies of the policy (and of the reference and old policy) come from
the last hidden states and the model's own output head, so the ``[B, T, V]`` logits are never built; the
old policy's and the reference's, without gradients, through the training loss's own pass
(:func:`fastalign.linear_policy.policy_logprobs`), so an on-policy ratio is exactly 1 as in TRL;
the loss is :class:`fastalign.integrations.trl.GRPOLoss` of the trainer's config, and the metrics
go through TRL's own ``_metrics`` under TRL's names. The training loss goes through the head
itself (:func:`fastalign.linear_policy.policy_step`): one pass over blocks of whole completions,
three matrix products instead of four, unless ``top_entropy_quantile < 1`` (the entropy quantile
over every process comes first). Generation, rewards, advantages, sampling
and logging are TRL's.

``cast_lm_head_to_fp32`` runs the fused head in fp32 (hidden states and head cast up), as TRL's
trainer runs its own; ``use_adaptive_entropy`` runs TRL's controller of ``entropy_coef`` on the
entropies of the loss's own pass; a MoE model's load-balancing loss (``router_aux_loss_coef`` with
``output_router_logits``) comes from the router logits of the same body forward, as TRL adds it.
Options the drop-in cannot honour raise a ValueError naming the config field at construction:
``use_liger_kernel``, an architecture without a known head transform, a ``scale_rewards`` other than ``"group"``
with ``multi_objective_aggregation="normalize_then_sum"`` (which TRL ignores there); a float64 policy or reference
raises a TypeError there unless ``cast_lm_head_to_fp32`` or mixed precision runs the head in another dtype. The
options TRL reads from the trainer at every step (``beta``, ``loss_type``, ``epsilon_low`` / ``epsilon_high``,
``importance_sampling_level``, ``top_entropy_quantile``, ``off_policy_mask_threshold``, ``entropy_coef``,
``max_completion_length``, the vLLM importance-sampling ones) are read here too, so an assignment on the trainer
takes effect at the next step, and so are the config fields TRL's loss reads from ``self.args`` at every step
(``delta``, ``use_bias_correction_kl``, ``sapo_temperature_pos`` / ``_neg``, ``vespo_*``,
``steps_per_generation``: a callback that changes ``args.delta``); ``temperature`` reaches generation only, as
TRL's fused head keeps the one it was built with. With several processes the token-mean metrics (``entropy``,
``kl``, ``clip_ratio/*_mean``, ...) weight every process's tokens as TRL does, and ``top_entropy_quantile < 1``
keeps the tokens at or above the entropy quantile over every process's valid tokens (gathered here, as TRL
gathers them; see :func:`fastalign.integrations.trl.entropy_threshold`).
"""
from __future__ import annotations

import functools

import torch
import trl
from trl.trainer.utils import nanmax, nanmin

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import (add_aux_loss, fused_logps_and_entropies, head_policy_loss,
                                              install_heads)
from fastalign.integrations.trl._live_loss import LiveLoss, build_loss
from fastalign.integrations.trl._metrics import reduced_metric
from fastalign.integrations.trl._vision import batch_vision
from fastalign.integrations.trl.grpo import GRPOLoss, entropy_threshold, grpo_policy_config
from fastalign.integrations.trl.grpo_rewards import reward_scaling

__all__ = ["GRPOTrainer"]

#: Metrics TRL reduces over the processes' own values; the others are token (or row) means over every process.
_PER_PROCESS = {"policy_loss": torch.nanmean, "clip_ratio/low_min": nanmin, "clip_ratio/high_max": nanmax}
#: Means of a per-ratio quantity: one value per row under ``importance_sampling_level="sequence"``.
_RATIO_MEANS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio")


def _entropy_coef(trainer) -> float:
    """TRL's entropy bonus coefficient in the config: 0 unless its constructor enabled the bonus
    (``_entropy_bonus_enabled``); then the config's, and each call passes the step's coefficient (the adaptive
    controller's, or the ``entropy_coef`` attribute, 0 included: the bonus stays on, :func:`_coefficient_per_call`)."""
    return trainer.args.entropy_coef if trainer._entropy_bonus_enabled else 0.0


def _coefficient_per_call(trainer) -> bool:
    """Whether each call passes the entropy bonus coefficient (``GRPOLoss``'s ``use_adaptive_entropy``): wherever
    TRL's bonus is on, which then logs ``policy_loss`` and ``entropy_coef`` at every step, also at 0."""
    return trainer._entropy_bonus_enabled


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with fastalign's fused log-probs, entropies and loss (see the module doc)."""

    #: the options TRL's ``_compute_loss`` reads from the trainer at every step -> their ``GRPOConfig`` fields, and
    #: (``args``) the config fields it reads from ``self.args`` at every step
    fastalign_loss = LiveLoss(GRPOLoss, {
        "loss_type": "loss_type", "beta": "beta", "epsilon_low": "epsilon", "epsilon_high": "epsilon_high",
        "importance_sampling_level": "importance_sampling_level", "top_entropy_quantile": "top_entropy_quantile",
        "off_policy_mask_threshold": "off_policy_mask_threshold", "max_completion_length": "max_completion_length",
        "use_vllm": "use_vllm", "vllm_importance_sampling_correction": "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode": "vllm_importance_sampling_mode",
        "vllm_importance_sampling_clip_min": "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_clip_max": "vllm_importance_sampling_clip_max",
        "entropy_coef": ("entropy_coef", _entropy_coef),
        "use_adaptive_entropy": ("use_adaptive_entropy", _coefficient_per_call),
    }, args=("delta", "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
             "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "steps_per_generation"))

    @functools.wraps(trl.GRPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, trl.GRPOTrainer.__init__, args, kwargs, self._check_config)
        # cast_lm_head_to_fp32: TRL made the head fp32; the fused head runs in fp32 too, hidden states cast up
        head_dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else None
        check_model(self, "GRPOConfig", head_dtype=head_dtype)
        build_loss(self)
        install_heads(self, temperature=self.temperature, head_dtype=head_dtype)

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "GRPOConfig")
        grpo_policy_config(args)  # raises on a loss_type or option the profile does not map
        reward_scaling(args)  # a scale_rewards that TRL ignores raises, as the advantage profile does

    _get_per_token_logps_and_entropies = fused_logps_and_entropies

    def _policy_pass(self):
        """The loss's pass through the head (its ``token_separable``), which the old policy's and the reference's
        log-probs take too, so an on-policy ratio is exactly 1 (:func:`fused_logps_and_entropies`); None with
        ``top_entropy_quantile < 1``, whose loss takes the log-probs of ``_get_per_token_logps_and_entropies``."""
        return None if self.top_entropy_quantile < 1.0 else self.fastalign_loss.config.token_separable

    def _adapt_entropy_coef(self, entropies, bonus_mask) -> None:
        """TRL's adaptive entropy controller (``use_adaptive_entropy``): the token-weighted entropy of the
        optimizer step's micro-batches over every process; at the step's end ``entropy_coef`` moves up by
        ``entropy_coef_delta`` (at most ``entropy_coef_max``) when that entropy is at or below
        ``entropy_target``, else down (at least ``entropy_coef_min``). The state is TRL's own attributes,
        so its checkpoints save and restore it."""
        stats = torch.stack([(entropies * bonus_mask).sum(), bonus_mask.sum()]).detach()
        window = self._entropy_window_stats
        self._entropy_window_stats = stats if window is None else window + stats
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        a = self.args
        if entropy <= a.entropy_target:
            self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
        self._last_world_entropy = entropy
        self._entropy_window_stats = None

    def _compute_loss(self, model, inputs):
        """TRL's ``_compute_loss`` contract: the micro-batch loss; the metrics go to ``self._metrics``.

        With ``top_entropy_quantile = 1`` the loss goes through the head itself (:func:`fastalign.linear_policy.
        policy_step`: one pass over blocks of whole sequences when gradients are needed); otherwise the
        entropies of every process come first (the quantile), then the loss."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        vision = batch_vision(inputs)
        old = inputs.get("old_per_token_logps")
        mode = "train" if self.model.training else "eval"
        grpo_loss = self.fastalign_loss  # the options assigned since the last step, checked
        coef = None  # the step's bonus coefficient: the attribute, or the adaptive controller's from the last
        if grpo_loss.adaptive_entropy:  # optimizer step, applied at or below the target
            coef = self.entropy_coef
            if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
                coef = 0.0

        def grpo(per_token_logps, old_logps, entropies, threshold=None):
            sampling = inputs.get("sampling_per_token_logps")
            if sampling is None and self.off_policy_mask_threshold is not None:
                sampling = old_logps.detach()
            return grpo_loss(
                per_token_logps, old_logps, inputs["advantages"], mask, entropy=entropies,
                ref_logprobs=inputs.get("ref_per_token_logps"), sampling_logprobs=sampling,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                num_items_in_batch=inputs.get("num_items_in_batch"), num_processes=self.accelerator.num_processes,
                training=mode == "train", gradient_accumulation_steps=self.current_gradient_accumulation_steps,
                entropy_threshold=threshold, entropy_coef=coef)

        if self.top_entropy_quantile < 1.0:  # over every process's tokens, as TRL's get_high_entropy_mask
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, ids, attention, completion_ids.size(1), compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **vision)
            threshold = entropy_threshold(entropies, mask, self.top_entropy_quantile, self.accelerator)
            loss, metrics = grpo(per_token_logps, per_token_logps.detach() if old is None else old, entropies,
                                 threshold)
            bonus_mask = mask * ((entropies >= threshold) & mask.bool())  # the tokens the entropy bonus acts on
        else:
            loss, metrics, entropies, aux_loss = head_policy_loss(
                self, model, ids, attention, completion_ids, completion_mask, old, grpo, vision,
                token_separable=grpo_loss.config.token_separable)
            bonus_mask = mask
        if self.use_adaptive_entropy and grpo_loss.adaptive_entropy and mode == "train":
            self._adapt_entropy_coef(entropies, bonus_mask)
        log = self._metrics[mode]
        # the MoE load-balancing loss, scaled for gradient accumulation as TRL's
        loss = add_aux_loss(self, loss, aux_loss, mode,
                            scale=self.current_gradient_accumulation_steps if mode == "train" else 1.0)
        sequence_ratio = self.importance_sampling_level == "sequence"
        for name, value in metrics.items():
            if name == "entropy_coef":
                if self.accelerator.sync_gradients:
                    log[name].append(float(self.entropy_coef))
            else:  # the others: a mean over every process's tokens (rows, for a sequence-level ratio), as TRL
                # reduces it; completions of one token: every row (TRL reads its [B, 1] tensors as one value per row)
                per_row = (mask.size(1) == 1 or name == "vespo/phi_seq_mean"
                           or (sequence_ratio and name in _RATIO_MEANS))
                count = mask.size(0) if per_row else mask.sum()
                log[name].append(reduced_metric(self.accelerator, value, count, _PER_PROCESS.get(name)))
        return loss
