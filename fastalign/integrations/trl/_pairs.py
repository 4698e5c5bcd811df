"""The drop-in trainers whose pairs are concatenated chosen-then-rejected rows in one forward (TRL's CPO and ORPO):
:class:`ConcatenatedPairsMixin`, their loss through the fused head over blocks of whole pairs."""
from __future__ import annotations

import torch

from fastalign.integrations.hf import next_token_targets
from fastalign.integrations.trl._checks import check_model
from fastalign.integrations.trl._head import add_aux_loss, head_separable_loss, install_head, policy_operands
from fastalign.integrations.trl._live_loss import build_loss
from fastalign.integrations.trl._metrics import gathered_mean


class ConcatenatedPairsMixin:
    r"""``get_batch_loss_metrics`` of TRL's concatenated-pairs trainers (``CPOTrainer``, ``ORPOTrainer``)
    from the fused head: one forward over the chosen then the rejected rows, the trainer's profile loss
    (``fastalign_loss``) of the scored tokens' log-probs through the head itself (:func:`head_separable_loss`:
    one pass over blocks of whole pairs when gradients are needed) and TRL's metrics.

    A subclass sets ``fastalign_loss`` (a :class:`LiveLoss` of its profile), ``config_name``,
    ``nll_over_prompt`` (ORPO: the NLL runs over every attended token, so the prompt is scored too)
    and ``logits_last_position`` (CPO's ``logits/*`` average every position, ORPO's drop the last).
    ``logits/*`` is TRL's mean logit ``mean_{b,t,j} z_{b,t,j}`` of each half, from one ``H``-vector (a
    softcapped head: one more vocabulary pass without gradients,
    :func:`fastalign.linear_mean_logits`); the per-pair metrics (``rewards/*``, ``logps/*``)
    are averaged over every process's pairs and the per-batch ones (``nll_loss``, ``logits/*``, ORPO's
    ``log_odds_*``) over processes, as TRL gathers them.

    A length-averaged loss (ORPO; CPO's ipo, simpo, alphapo) on a batch holding a row with no
    completion token (its prompt fills ``max_length``, so truncation leaves nothing to score) raises a
    ValueError naming ``max_length``: the average is 0/0 there, which TRL turns into a NaN loss and NaN
    weights after the step. The check gathers one flag per batch, after the metrics are read back, so
    every process raises together."""

    config_name = ""
    nll_over_prompt = False
    logits_last_position = True

    def _setup_pairs(self) -> None:
        check_model(self, self.config_name)
        if self.is_encoder_decoder:
            raise ValueError(f"{self.config_name}.is_encoder_decoder: the fastalign trainers take decoder-only causal "
                             "LMs")
        build_loss(self)
        install_head(self.accelerator.unwrap_model(self.model))

    def _padding_value(self) -> int:
        return self.padding_value if hasattr(self, "padding_value") else self.pad_token_id

    def _empty_completion(self, completion_mask) -> bool:
        """Whether a row of any process's batch has no completion token (every process raises together)."""
        empty = (completion_mask.sum(1) == 0).any().reshape(1).to(torch.int32)
        return bool(self.accelerator.gather(empty).any())

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        pair_loss = self.fastalign_loss  # the options assigned since the last step, checked
        cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self._padding_value(),
                                       device=self.accelerator.device)
        ids, attention = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        completion_labels = cat["concatenated_labels"]
        pairs = batch["chosen_labels"].shape[0]
        labels = ids.masked_fill(attention == 0, -100) if self.nll_over_prompt else completion_labels
        targets = next_token_targets(ids, labels=labels, attention_mask=attention)
        completion_mask = (completion_labels[:, 1:] != -100).float()
        extra = (attention[:, 1:].float(),) if self.nll_over_prompt else ()
        policy = policy_operands(self, model, input_ids=ids, attention_mask=attention, use_cache=False)
        loss, metrics, stats = head_separable_loss(
            policy.operands, self.accelerator.unwrap_model(self.model).config, targets,
            lambda per_token_logps, _sum_p2: pair_loss(per_token_logps, completion_mask, *extra),
            position_means="every")
        # the MoE load-balancing loss of the same forward, with the config's coefficient, not logged (as TRL)
        loss = add_aux_loss(self, loss, policy.aux_loss, None, coef=self.aux_loss_coef)

        prefix = "eval_" if train_eval == "eval" else ""
        logged = {}
        for name, value in metrics.items():
            if name in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):  # one value per process in TRL
                logged[prefix + name] = self.accelerator.gather_for_metrics(value.detach().float()).mean().item()
            else:
                logged[prefix + name] = gathered_mean(self.accelerator, value, pairs)
        position_means = stats["position_mean_logits"]
        if not self.logits_last_position:
            position_means = position_means[:, :-1]
        for name, half in (("logits/chosen", position_means[:pairs]), ("logits/rejected", position_means[pairs:])):
            logged[prefix + name] = self.accelerator.gather_for_metrics(half.mean()).mean().item()
        if pair_loss.averaged and self._empty_completion(completion_mask):
            raise ValueError(f"{self.config_name}.max_length: a pair has a row with no completion token (its prompt "
                             f"fills max_length={self.max_length}, so truncation leaves an empty completion); the "
                             f"length-averaged log-probs of this loss are 0/0 there (TRL gives a NaN loss and NaN "
                             f"weights after the step). Increase max_length or filter out the long prompts")
        return loss, logged
