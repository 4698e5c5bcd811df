"""Liger-Kernel 0.8's chunked losses as functions, ``liger_kernel.chunked_loss.functional``: the same names, positional
arguments (their order and defaults those of each Liger ``Function.forward``) and return values, each computed by the
fastalign module of :mod:`fastalign.integrations.liger` that mirrors Liger's module of that loss. A user swaps the
import::

    from fastalign.integrations.liger_chunked_functional import liger_fused_linear_dpo
    # was: from liger_kernel.chunked_loss.functional import liger_fused_linear_dpo

Each function builds its module with the options among its arguments (checked there: a value the module refuses
raises the module's ``ValueError`` / ``TypeError``, naming the option) and calls it on the tensors; the formulas,
what each returns and where fastalign differs from Liger are the modules' (docs/integrations.md#liger-kernel).
``compiled`` and ``chunk_size`` choose how Liger runs: the modules check them and they change nothing. Mind the
defaults of Liger's functions, which are not always its modules': ``liger_fused_linear_simpo`` has
``compute_nll_loss=False`` and ``liger_fused_linear_kto`` ``use_ref_model=True``. Unlike a Liger function, the loss
is differentiated once per call by default (the modules' single pass); for a second backward through a retained
graph, build the module and set ``loss_fn.single_pass = False``. ``liger_kernel.transformers.functional``'s losses
are in :mod:`fastalign.integrations.liger_functional`. Nothing here imports Liger-Kernel.
"""
from __future__ import annotations

from fastalign.integrations.liger import (LigerFusedLinearCosineSimilarityLoss, LigerFusedLinearCPOLoss,
                                          LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss, LigerFusedLinearJSDLoss,
                                          LigerFusedLinearKTOLoss, LigerFusedLinearORPOLoss, LigerFusedLinearSimPOLoss)

__all__ = ["liger_fused_linear_orpo", "liger_fused_linear_dpo", "liger_fused_linear_jsd", "liger_fused_linear_cosine",
           "liger_fused_linear_cpo", "liger_fused_linear_simpo", "liger_fused_linear_kto", "liger_fused_linear_grpo"]


def liger_fused_linear_orpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, compute_nll_loss=True,
                            nll_target=None, compiled=True, chunk_size=1):
    """Liger's ``liger_fused_linear_orpo`` (``LigerFusedLinearORPOFunction.apply``), computed by
    :class:`~fastalign.integrations.liger.LigerFusedLinearORPOLoss`: ``(loss, (chosen_logps, rejected_logps,
    chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards, log_odds_ratio,
    log_odds_chosen))``."""
    loss_fn = LigerFusedLinearORPOLoss(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss,
                                       compiled=compiled, chunk_size=chunk_size)
    return loss_fn(weight, _input, target, bias=bias, nll_target=nll_target)


def liger_fused_linear_dpo(_input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                           ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True,
                           average_log_prob=False, chunk_size=1, loss_type="sigmoid", label_smoothing=0.0,
                           discopop_tau=0.05, alpha=1.0):
    """Liger's ``liger_fused_linear_dpo`` (``LigerFusedLinearDPOFunction.apply``), computed by
    :class:`~fastalign.integrations.liger.LigerFusedLinearDPOLoss`: ``(loss, (chosen_logps, rejected_logps,
    chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``."""
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=ignore_index, beta=beta, alpha=alpha,
                                      compute_nll_loss=compute_nll_loss, compiled=compiled,
                                      use_ref_model=use_ref_model, average_log_prob=average_log_prob,
                                      chunk_size=chunk_size, loss_type=loss_type, label_smoothing=label_smoothing,
                                      discopop_tau=discopop_tau)
    return loss_fn(weight, _input, target, bias=bias, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)


def liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                           teacher_bias, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100,
                           temperature=1.0, compiled=True, chunk_size=1024, return_soft_hard_loss=False):
    """Liger's ``liger_fused_linear_jsd`` of ``chunked_loss`` (``LigerFusedLinearJSDFunction.apply``; the biases are
    required arguments, None for none, as there), computed by
    :class:`~fastalign.integrations.liger.LigerFusedLinearJSDLoss`: ``loss``, or ``(loss, soft_loss, hard_loss)``
    with ``return_soft_hard_loss``."""
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss, beta=beta,
                                      ignore_index=ignore_index, temperature=temperature, compiled=compiled,
                                      chunk_size=chunk_size, return_soft_hard_loss=return_soft_hard_loss)
    return loss_fn(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                   student_bias=student_bias, teacher_bias=teacher_bias)


def liger_fused_linear_cosine(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                              teacher_bias, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100,
                              temperature=1.0, compiled=True, chunk_size=1024, return_soft_hard_loss=False):
    """Liger's ``liger_fused_linear_cosine`` (``LigerFusedLinearCosineSimilarityFunction.apply``; the biases are
    required arguments, None for none, as there), computed by
    :class:`~fastalign.integrations.liger.LigerFusedLinearCosineSimilarityLoss`: ``loss``, or ``(loss, soft_loss,
    hard_loss)`` with ``return_soft_hard_loss``."""
    loss_fn = LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=weight_hard_loss,
                                                   weight_soft_loss=weight_soft_loss, beta=beta,
                                                   ignore_index=ignore_index, temperature=temperature,
                                                   compiled=compiled, chunk_size=chunk_size,
                                                   return_soft_hard_loss=return_soft_hard_loss)
    return loss_fn(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                   student_bias=student_bias, teacher_bias=teacher_bias)


def liger_fused_linear_cpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
                           label_smoothing=0.0, compute_nll_loss=True, compiled=True, average_log_prob=False,
                           chunk_size=1):
    """Liger's ``liger_fused_linear_cpo`` (``LigerFusedLinearCPOFunction.apply``), computed by
    :class:`~fastalign.integrations.liger.LigerFusedLinearCPOLoss`: ``(loss, (chosen_logps, rejected_logps,
    chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``."""
    loss_fn = LigerFusedLinearCPOLoss(ignore_index=ignore_index, beta=beta, alpha=alpha,
                                      label_smoothing=label_smoothing, compute_nll_loss=compute_nll_loss,
                                      compiled=compiled, average_log_prob=average_log_prob, chunk_size=chunk_size)
    return loss_fn(weight, _input, target, bias=bias)


def liger_fused_linear_simpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
                             label_smoothing=0.0, compute_nll_loss=False, compiled=True, gamma=0.5, chunk_size=1):
    """Liger's ``liger_fused_linear_simpo`` (``LigerFusedLinearSimPOFunction.apply``; ``compute_nll_loss`` defaults
    to False there, True in the module), computed by :class:`~fastalign.integrations.liger.LigerFusedLinearSimPOLoss`:
    ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards))``."""
    loss_fn = LigerFusedLinearSimPOLoss(ignore_index=ignore_index, beta=beta, alpha=alpha,
                                        label_smoothing=label_smoothing, compute_nll_loss=compute_nll_loss,
                                        compiled=compiled, gamma=gamma, chunk_size=chunk_size)
    return loss_fn(weight, _input, target, bias=bias)


def liger_fused_linear_kto(_input, weight, target, preference_labels, bias=None, ref_input=None, ref_weight=None,
                           ref_bias=None, kl=None, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=True,
                           average_log_prob=False, chunk_size=1):
    """Liger's ``liger_fused_linear_kto`` (``LigerFusedLinearKTOFunction.apply``; ``use_ref_model`` defaults to True
    there, False in the module), computed by :class:`~fastalign.integrations.liger.LigerFusedLinearKTOLoss`:
    ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum, chosen_rewards_sum,
    rejected_rewards_sum))``."""
    loss_fn = LigerFusedLinearKTOLoss(ignore_index=ignore_index, beta=beta, compiled=compiled,
                                      use_ref_model=use_ref_model, average_log_prob=average_log_prob,
                                      chunk_size=chunk_size)
    return loss_fn(_input, weight, target, bias=bias, preference_labels=preference_labels, ref_input=ref_input,
                   ref_weight=ref_weight, ref_bias=ref_bias, kl=kl)


def liger_fused_linear_grpo(_input, weight, selected_token_ids, attention_mask, advantages, bias=None,
                            ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                            ref_bias=None, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo",
                            max_completion_length=None, importance_sampling_level="token", sapo_temperature_pos=1.0,
                            sapo_temperature_neg=1.05, temperature=1.0, compiled=True, use_ref_model=True,
                            chunk_size=1, vllm_is_ratio=None, delta=None, use_bias_correction_kl=False,
                            vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                            num_items_in_batch=None):
    """Liger's ``liger_fused_linear_grpo`` (``LigerFusedLinearGRPOFunction.apply``), computed by
    :class:`~fastalign.integrations.liger.LigerFusedLinearGRPOLoss`: ``(loss, (kl, clip_ratio))`` with ``beta != 0``,
    else ``(loss, (clip_ratio,))``."""
    loss_fn = LigerFusedLinearGRPOLoss(beta=beta, compiled=compiled, use_ref_model=use_ref_model,
                                       chunk_size=chunk_size, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                       loss_type=loss_type, max_completion_length=max_completion_length,
                                       importance_sampling_level=importance_sampling_level,
                                       sapo_temperature_pos=sapo_temperature_pos,
                                       sapo_temperature_neg=sapo_temperature_neg, temperature=temperature,
                                       delta=delta, use_bias_correction_kl=use_bias_correction_kl,
                                       vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
                                       vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    return loss_fn(_input, weight, selected_token_ids, attention_mask, advantages, bias=bias,
                   ref_per_token_logps=ref_per_token_logps, old_per_token_logps=old_per_token_logps,
                   ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias, vllm_is_ratio=vllm_is_ratio,
                   num_items_in_batch=num_items_in_batch)
