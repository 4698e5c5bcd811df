r"""Cross-entropy against soft targets from hidden states (docs/math.md#soft-targets): distillation from cached
teacher probabilities, label distributions, without the ``[tokens x V]`` logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _dtensor, _validate
from fastalign._options import AUTO_OR_BOOL, check_choice
from fastalign.linear import check_head
from fastalign.ops.single_pass import refuse_traced, rows_take_single_pass
from fastalign.ops.soft_cross_entropy import SoftCrossEntropy

__all__ = ["linear_soft_cross_entropy"]


def linear_soft_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                              temperature: float = 1.0, row_weights: Optional[Tensor] = None,
                              single_pass="auto") -> Tensor:
    r"""The cross-entropy of the head's distribution against soft targets, summed over rows with weights.

    With ``z_r = hidden_r . weight^T + bias``, ``p_r = softmax(z_r / T)``, targets ``q_r`` (non-negative weights
    over the vocabulary; ``m_r = sum_j q_rj`` need not be 1) and row weights ``c_r``::

        loss = sum_r c_r CE_r,     CE_r = -sum_j q_rj log p_rj = sum_j q_rj (lse_r - z_rj / T)
        d loss / d z_rj = c_r (m_r p_rj - q_rj) / T

    ``lse_r = log sum_j exp(z_rj / T)``. The KL divergence ``KL(q_r || p_r)`` is ``CE_r + sum_j q_rj log q_rj``
    (a constant of the targets), so this is the loss of distillation from a teacher's cached probabilities.
    ``CE`` is summed in fp32 from terms that are each >= 0, and the gradient of each logit is formed whole in
    fp32 before it is rounded once (it is not the difference of two separately rounded gradients, which would
    lose the small ``m p - q`` of a student close to its targets). The rows go through the vocabulary a block at
    a time (``FASTALIGN_BLOCK_MIB``), never ``tokens x V``; a row of weight 0 is not read (its hidden state and
    target may hold anything).

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16. A DTensor (and ``weight``, ``bias``) is gathered.
        weight: ``[V, H]`` in ``hidden``'s dtype.
        target: ``[..., V]`` (``hidden.shape[:-1] + (V,)``), any float dtype; no gradient.
        bias: optional ``[V]``.
        temperature: ``T`` > 0, dividing the logits (not the targets).
        row_weights: optional ``hidden.shape[:-1]`` weights ``c`` (bool, integer or float; no gradient; 1
            without): a mask, or a mask over the count of scored rows for a mean.
        single_pass: ``"auto"`` (default) computes the gradients in the forward pass where autograd may ask for
            them in a plain eager call (three products per row instead of four), except fp16 on a GPU, whose
            gradients would be formed before a loss scale reaches them; ``True`` always there (a ``ValueError``
            under ``torch.compile``); ``False`` recomputes the logits in the backward. The single pass's graph
            can be differentiated once.

    Returns:
        The loss, fp32, 0-dim; gradients reach ``hidden``, ``weight`` and ``bias``.
    """
    hidden, weight, bias, _ = _dtensor.head(hidden, weight, bias)
    check_head(hidden, weight, bias)
    V = weight.shape[0]
    _validate.any_float("target", target)
    _validate.shape("target", target, (*hidden.shape[:-1], V), "hidden.shape[:-1] + (V,)")
    if row_weights is not None:
        _validate.real("row_weights", row_weights)
        _validate.shape("row_weights", row_weights, tuple(hidden.shape[:-1]), "hidden.shape[:-1]")
    _validate.same_device(hidden=hidden, weight=weight, bias=bias, target=target, row_weights=row_weights)
    inv_t = _validate.inverse_temperature(temperature)
    check_choice("single_pass", single_pass, AUTO_OR_BOOL)
    refuse_traced(single_pass, hidden, weight, bias, target, row_weights)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    q = target.detach().reshape(-1, V)
    coef = None if row_weights is None else row_weights.detach().reshape(-1).float()
    single = rows_take_single_pass(single_pass, hidden, weight, bias, target)
    with torch.autocast(hidden.device.type, enabled=False):  # the head runs in its operands' dtype
        return SoftCrossEntropy.apply(h2, weight, bias, q, coef, inv_t, single)
