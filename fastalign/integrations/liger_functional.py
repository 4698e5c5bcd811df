"""Liger-Kernel 0.8's fused losses of ``liger_kernel.transformers.functional`` as functions: the same names,
positional arguments (order and defaults) and return values, each computed by the fastalign module of
:mod:`fastalign.integrations.liger` that mirrors Liger's module of that loss. A user swaps the import::

    from fastalign.integrations.liger_functional import liger_fused_linear_cross_entropy
    # was: from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

Here: :func:`liger_cross_entropy` (on logits), :func:`liger_fused_linear_cross_entropy`, :func:`liger_fused_linear_jsd`
(soft labels only: not the ``chunked_loss`` function of that name, which is in
:mod:`fastalign.integrations.liger_chunked_functional`), :func:`liger_fused_linear_kl_div`, and, re-exported from
:mod:`fastalign.integrations.liger_vocab_parallel`, :func:`liger_fused_linear_scaled_cross_entropy_tp` and, from
:mod:`fastalign.integrations.liger_elementwise`, the losses on given (log-)probabilities :func:`liger_jsd`,
:func:`liger_kl_div` and :func:`liger_tvd`. Each function
builds its module with the options among its arguments (checked there: a value the module refuses raises the module's
``ValueError`` / ``TypeError``, naming the option) and calls it; the formulas, the outputs (a loss, or a
:class:`~fastalign.integrations.liger_cross_entropy.CrossEntropyOutput` with ``return_z_loss``,
``return_token_accuracy`` or ``return_predicted_tokens``, as Liger's) and where fastalign differs from Liger are the
modules' (docs/integrations.md#liger-kernel). ``accum_dtype`` is checked by the modules and changes nothing; the
execution option ``chunk_mem_const`` is checked as Liger checks it and changes nothing. Unlike Liger's,
:func:`liger_fused_linear_jsd` is differentiated once per call (its module's single pass); for a second backward
through a retained graph, build the module and set ``loss_fn.single_pass = False``. Nothing here imports Liger-Kernel.
"""
from __future__ import annotations

from fastalign import _validate
from fastalign.integrations._liger_checks import legacy_reduction_arguments
from fastalign.integrations.liger import (LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD,
                                          LigerFusedLinearKLDivLoss)
from fastalign.integrations.liger_elementwise import liger_jsd, liger_kl_div, liger_tvd
from fastalign.integrations.liger_vocab_parallel import liger_fused_linear_scaled_cross_entropy_tp

__all__ = ["liger_cross_entropy", "liger_fused_linear_cross_entropy", "liger_fused_linear_jsd",
           "liger_fused_linear_kl_div", "liger_fused_linear_scaled_cross_entropy_tp", "liger_jsd", "liger_kl_div",
           "liger_tvd"]


def liger_cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                        reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                        softcap=None, return_z_loss: bool = False, return_token_accuracy: bool = False,
                        return_predicted_tokens: bool = False):
    """Liger's ``liger_cross_entropy`` on logits ``input [BT, V]``, computed by
    :class:`~fastalign.integrations.liger.LigerCrossEntropyLoss` (``weight``: the class weights): the loss, or a
    ``CrossEntropyOutput`` with a ``return_*`` switch. ``size_average`` and ``reduce`` are
    ``torch.nn.functional.cross_entropy``'s legacy arguments, which Liger's function takes and ignores: None is
    accepted, any other value raises ``ValueError`` naming it (pass ``reduction``)."""
    legacy_reduction_arguments("liger_cross_entropy", None, size_average=size_average, reduce=reduce)
    loss_fn = LigerCrossEntropyLoss(weight=weight, ignore_index=ignore_index, lse_square_scale=lse_square_scale,
                                    label_smoothing=label_smoothing, reduction=reduction, softcap=softcap,
                                    return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                                    return_predicted_tokens=return_predicted_tokens)
    return loss_fn(input, target)


def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None, ignore_index: int = -100,
                                     lse_square_scale: float = 0.0, label_smoothing: float = 0.0,
                                     reduction: str = "mean", softcap=None, return_z_loss: bool = False,
                                     accum_dtype=None, use_token_scaling: bool = False,
                                     return_token_accuracy: bool = False, return_predicted_tokens: bool = False,
                                     chunk_mem_const: int = 1):
    """Liger's ``liger_fused_linear_cross_entropy`` of hidden states ``input [BT, H]`` and the head ``weight [V,
    H]``, computed by :class:`~fastalign.integrations.liger.LigerFusedLinearCrossEntropyLoss`: the loss, or a
    ``CrossEntropyOutput`` with a ``return_*`` switch. ``chunk_mem_const`` (the logits budget of Liger's chunks) must
    be an int >= 1, as Liger requires, and changes nothing."""
    _validate.at_least("chunk_mem_const", chunk_mem_const, 1)
    loss_fn = LigerFusedLinearCrossEntropyLoss(ce_weight=ce_weight, ignore_index=ignore_index,
                                               lse_square_scale=lse_square_scale, label_smoothing=label_smoothing,
                                               reduction=reduction, softcap=softcap, return_z_loss=return_z_loss,
                                               accum_dtype=accum_dtype, use_token_scaling=use_token_scaling,
                                               return_token_accuracy=return_token_accuracy,
                                               return_predicted_tokens=return_predicted_tokens)
    return loss_fn(weight, input, target, bias=bias)


def liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels=None,
                           jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                           accum_dtype=None):
    """Liger's ``liger_fused_linear_jsd`` of ``transformers.functional`` (the generalized JSD alone, no hard loss),
    computed by :class:`~fastalign.integrations.liger.LigerFusedLinearJSD`: the fp32 loss."""
    loss_fn = LigerFusedLinearJSD(jsd_beta=jsd_beta, ignore_index=ignore_index, temperature=temperature,
                                  accum_dtype=accum_dtype)
    return loss_fn(student_input, student_weight, teacher_input, teacher_weight, shift_labels=shift_labels)


def liger_fused_linear_kl_div(student_input, student_weight, target, shift_labels=None, reduction: str = "batchmean",
                              ignore_index: int = -100, temperature: float = 1.0, eps: float = 1e-10,
                              accum_dtype=None):
    """Liger's ``liger_fused_linear_kl_div`` (the KL divergence of the student's head from the target probabilities
    ``target [BT, V]``), computed by :class:`~fastalign.integrations.liger.LigerFusedLinearKLDivLoss`: the fp32
    loss."""
    loss_fn = LigerFusedLinearKLDivLoss(reduction=reduction, ignore_index=ignore_index, temperature=temperature,
                                        eps=eps, accum_dtype=accum_dtype)
    return loss_fn(student_input, student_weight, target, shift_labels=shift_labels)
