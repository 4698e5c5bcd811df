"""``GMPOTrainer``: TRL 1.16's ``trl.experimental.gmpo.GMPOTrainer`` with its log-probs, entropies and loss in
fastalign.

Same constructor, same ``GMPOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import GMPOTrainer   # was: from trl.experimental.gmpo import GMPOTrainer

Per-token log-probs and entropies of the policy (and of the reference and old policy) come from the fused head
(:func:`fastalign.integrations.hf.causal_lm_logprobs`, no ``[B, T, V]`` logits), as in the drop-in
``GRPOTrainer``; the loss is :class:`fastalign.integrations.trl.GMPOLoss` of the trainer's options (``beta``,
``epsilon_low`` / ``epsilon_high``, ``top_entropy_quantile``, read at every step as TRL reads them) and the metrics
go through TRL's ``_metrics`` under TRL's names, reduced over the processes as TRL reduces them (the entropy quantile
too: :func:`fastalign.integrations.trl.entropy_threshold`). ``use_liger_kernel`` and an architecture without a
known head transform raise a ValueError at construction. Like TRL's ``GMPOTrainer`` the loss adds no MoE
load-balancing term.
"""
from __future__ import annotations

import functools

import torch
from trl.experimental import gmpo as trl_gmpo
from trl.trainer.utils import nanmax, nanmin

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import fused_logps_and_entropies, install_heads
from fastalign.integrations.trl._live_loss import LiveLoss, build_loss
from fastalign.integrations.trl._metrics import reduced_metric
from fastalign.integrations.trl._vision import batch_vision
from fastalign.integrations.trl.gmpo import GMPOLoss
from fastalign.integrations.trl.grpo import entropy_threshold
from fastalign.integrations.trl.grpo_rewards import reward_scaling

__all__ = ["GMPOTrainer"]

#: Metrics TRL reduces over the processes' own extremes (each over its completions); the others are token means
#: over every process.
_PER_PROCESS = {"clip_ratio/low_min": nanmin, "clip_ratio/high_max": nanmax}


class GMPOTrainer(trl_gmpo.GMPOTrainer):
    """``trl.experimental.gmpo.GMPOTrainer`` with fastalign's fused log-probs, entropies and loss (see the module
    doc)."""

    #: the options TRL's ``_compute_loss`` reads from the trainer at every step -> their ``GMPOConfig`` fields
    fastalign_loss = LiveLoss(GMPOLoss, {"beta": "beta", "epsilon_low": "epsilon", "epsilon_high": "epsilon_high",
                                         "top_entropy_quantile": "top_entropy_quantile"})

    @functools.wraps(trl_gmpo.GMPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, trl_gmpo.GMPOTrainer.__init__, args, kwargs, self._check_config)
        head_dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else None
        check_model(self, "GMPOConfig", head_dtype=head_dtype)
        build_loss(self)
        install_heads(self, temperature=self.temperature, head_dtype=head_dtype)

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "GMPOConfig")
        GMPOLoss(args)
        reward_scaling(args)  # a scale_rewards that TRL ignores raises, as the advantage profile does

    _get_per_token_logps_and_entropies = fused_logps_and_entropies

    def _compute_loss(self, model, inputs):
        """TRL's ``_compute_loss`` contract: the micro-batch loss; the metrics go to ``self._metrics``."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, ids, attention, completion_ids.size(1), compute_entropy=True,
            **batch_vision(inputs))
        gmpo_loss = self.fastalign_loss  # the options assigned since the last step, checked
        threshold = None
        if gmpo_loss.top_entropy_quantile < 1.0:  # over every process's tokens, as TRL's get_high_entropy_mask
            threshold = entropy_threshold(entropies, mask, gmpo_loss.top_entropy_quantile, self.accelerator)
        mode = "train" if self.model.training else "eval"
        loss, metrics = gmpo_loss(
            per_token_logps, inputs.get("old_per_token_logps"), inputs["advantages"], mask, entropy=entropies,
            ref_logprobs=inputs.get("ref_per_token_logps"), training=mode == "train",
            gradient_accumulation_steps=self.current_gradient_accumulation_steps, entropy_threshold=threshold)
        log = self._metrics[mode]
        count = mask.sum() if mask.size(1) != 1 else mask.size(0)  # TRL's means of one-token completions: every row
        for name, value in metrics.items():
            log[name].append(reduced_metric(self.accelerator, value, count, _PER_PROCESS.get(name)))
        return loss
