r"""The head's mean logit at each position, from hidden states (docs/math.md#mean-logit).

Trainers log the mean logit of a batch (TRL's and Liger's ``logits/chosen``, ``logits/rejected``).
:func:`linear_mean_logits` gives it without the ``[tokens x vocabulary]`` logits: from one ``H``-vector when the
head is linear, a block of rows at a time through the vocabulary when it is softcapped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend, _dtensor, _validate
from fastalign.linear import _low_rank, check_head, check_logit_options
from fastalign.ops.mean_logits import SoftcappedMeanLogits

__all__ = ["linear_mean_logits"]

_CLASS_BLOCK_ELEMENTS = 1 << 23  # head elements widened to fp32 at a time for a class-weighted mean (32 MiB)


def linear_mean_logits(hidden: Tensor, weight: Tensor, *, bias: Optional[Tensor] = None, low_rank=None,
                       logit_scale: float = 1.0, softcap: Optional[float] = None,
                       response_mask: Optional[Tensor] = None, class_weights: Optional[Tensor] = None,
                       backend: Optional[str] = None) -> Tensor:
    r"""Mean logit of the head at each position, ``[...]`` fp32, differentiable.

    With the logit pipeline of :func:`fastalign.linear_logprobs` at temperature 1::

        u_j  = hidden . weight_j + a . L_j + bias_j          (a, L: the low-rank term)
        z_j  = softcap * tanh(logit_scale * u_j / softcap)   (z_j = logit_scale * u_j with softcap=None)
        mean = (1/V) sum_j c_j z_j                             (c_j = class_weights[j], 1 without)

    Without softcapping the mean is linear in the hidden states,
    ``logit_scale (hidden . mean_j c_j W_j + a . mean_j c_j L_j + mean_j c_j b_j)``: one ``H``-vector, no vocabulary
    pass.
    A softcapped head has no such form: its rows go through the vocabulary, a block of rows of the
    ``FASTALIGN_BLOCK_MIB`` budget at a time (never ``tokens x V``), and its gradient,
    ``d mean / d u_j = (logit_scale c_j / V) (1 - (z_j / softcap)^2)``, takes a second such pass (the logits
    recomputed). Gradients reach ``hidden``, ``weight``, ``bias`` and both factors of ``low_rank``; a label-smoothing
    term ``-(1/V) sum_j log p_j = logsumexp(z) - mean`` is one use. Where the log-probs are computed too,
    :func:`fastalign.linear_logprobs` with ``mean_logit=True`` gives this mean from their own pass, forward and
    backward (the scored rows only), with no pass of its own.

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16. A DTensor (and ``weight``, ``bias``) is gathered.
        weight: ``[V, H]`` in ``hidden``'s dtype.
        bias: optional ``[V]``.
        low_rank: optional ``(a [..., r], L [V, r])``, a LoRA head's term ``a @ L.T``.
        logit_scale, softcap: the head transform (``softcap=None`` is off).
        response_mask: optional, shaped like ``hidden.shape[:-1]``: the positions whose mean is wanted, the
            others 0. With a softcap only those rows go through the vocabulary (found on the host by the C++
            backend; put first and counted on the device by the others, without a host sync).
        class_weights: optional ``[V]`` float weights ``c`` of the mean (no gradient), such as a class-weighted
            label smoothing's ``sum_j c_j z_j = V mean``.
        backend: ``"cpp"``, ``"triton"`` or ``"cuda"`` (None: the current one for the device).

    Returns:
        ``[...]`` (``hidden.shape[:-1]``) fp32.
    """
    hidden, weight, bias, low_rank = _dtensor.head(hidden, weight, bias, low_rank)
    check_head(hidden, weight, bias)
    _validate.same_device(hidden=hidden, weight=weight, bias=bias)
    a, lora = _low_rank(low_rank, hidden, weight.shape[0])
    _, cap, scale = check_logit_options(softcap=softcap, logit_scale=logit_scale, backend=backend)
    name = _backend.resolve(hidden.device, backend)  # checked on every path, the plain products' too
    lead = tuple(hidden.shape[:-1])
    _validate.like(lead, "like hidden.shape[:-1]", kind="real", device=hidden.device, device_of="hidden",
                   response_mask=response_mask)
    keep = None if response_mask is None else response_mask.reshape(-1) != 0
    classes = None
    if class_weights is not None:
        _validate.floating("class_weights", class_weights)
        _validate.shape("class_weights", class_weights, (weight.shape[0],), "(weight.shape[0],)")
        _validate.same_device(weight=weight, class_weights=class_weights)
        classes = class_weights.detach().float()
    if not cap:  # linear in h: the means accumulate in fp32 without an fp32 copy of the [V, H] head
        def rows(t):  # the rows asked for; the others 0, so that they reach no gradient even where not finite
            t = t.reshape(-1, t.shape[-1]).float()
            return t if keep is None else torch.where(keep[:, None], t, 0.0)

        with torch.autocast(hidden.device.type, enabled=False):  # fp32 products, as the fused ops' (no bf16 cast)
            mean = rows(hidden) @ _class_mean(weight, classes)
            if a is not None:
                mean = mean + rows(a) @ _class_mean(lora, classes)
            if bias is not None:
                mean = mean + _class_mean(bias, classes)
        mean = (mean * scale).reshape(-1)
        mean = mean if keep is None else torch.where(keep, mean, 0.0)
    else:
        mean = SoftcappedMeanLogits.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, None if a is None else a.reshape(-1, a.shape[-1]),
            lora, scale, cap, keep, name, classes)
    return mean.reshape(lead)


def _class_mean(rows: Tensor, classes: Optional[Tensor]) -> Tensor:
    """``(1/V) sum_j c_j rows_j`` in fp32 over the first dim of ``rows [V, ...]`` (``c = 1`` when ``classes`` is
    None), with autograd; weighted, the rows are widened to fp32 a block of ``_CLASS_BLOCK_ELEMENTS`` at a time."""
    if classes is None:
        return rows.mean(0, dtype=torch.float32)
    V = rows.shape[0]
    step = max(1, _CLASS_BLOCK_ELEMENTS // max(1, rows[0].numel()))
    return sum(classes[i:i + step] @ rows[i:i + step].float() for i in range(0, V, step)) / V
