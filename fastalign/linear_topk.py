r"""The head's log-probs over a top-k support, from hidden states (docs/math.md#top-k-support).

Distillation over the student's top-k tokens (TRL's ``topk_logits`` self-distillation) needs, per token, the
ids of the ``k`` largest logits and the log-probs of both models there. :func:`linear_topk_logprobs` gives them
without the ``[tokens x vocabulary]`` logits: a block of rows at a time, each block's logits gone before the next.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign import _dtensor, _validate
from fastalign.linear import check_head, check_logit_options
from fastalign.ops._launch import eager
from fastalign.ops.linear_topk import TopKLogprobs

__all__ = ["TopKSupport", "linear_topk_logprobs"]


class TopKSupport(NamedTuple):
    """Log-probs ``[..., K]`` (fp32) of the ids ``[..., K]`` (int64) of each row's support."""

    logprobs: Tensor
    ids: Tensor


def linear_topk_logprobs(hidden: Tensor, weight: Tensor, k: Optional[int] = None, *, ids: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, response_mask: Optional[Tensor] = None,
                         temperature: float = 1.0, softcap: Optional[float] = None,
                         logit_scale: float = 1.0, renormalize: bool = False) -> TopKSupport:
    r"""Log-probs of the head over ``k`` ids per token: the ``k`` largest logits, or the ``ids`` given.

    With the logit pipeline of :func:`fastalign.linear_logprobs`
    (``z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature``)::

        ids      = topk_j(z_j, k)          (largest first; or the ids given)
        logprobs = z[ids] - log sum_j exp(z_j)              (over the vocabulary)
        logprobs = z[ids] - log sum_k exp(z[ids_k])         (renormalize=True: over the support)

    Gradients flow to ``hidden``, ``weight`` and ``bias`` through the log-probs (the selection is a constant, as
    ``torch.topk``'s): ``d lp_j / d z_i = [i = ids_j] - p_i``. The logits are built a block of rows at a time
    (``FASTALIGN_BLOCK_MIB``) and recomputed in backward, never ``tokens x V``.

    Renormalised over the support (TRL's top-k distillation without the tail bucket), the other logits enter only
    through the selection: ``d lp_j / d z[ids_i] = [i = j] - exp(lp_i)``, 0 elsewhere. A support given then
    costs ``K`` dot products per row (the head's rows at the ids) instead of a pass over the vocabulary, and the
    backward of either form touches only those ``K`` rows of the head (the top-k forward still computes each
    row's logits, to find the ids).

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16. A DTensor (and ``weight``, ``bias``) is gathered.
        weight: ``[V, H]`` in ``hidden``'s dtype.
        k: the support's size, ``1 <= k <= V``; exactly one of ``k`` and ``ids``.
        ids: integer ``[..., K]`` (``hidden.shape[:-1] + (K,)``): the support of each row (another model's
            top-k, say). An id outside the vocabulary gives a NaN log-prob (with ``renormalize``, NaN across its
            row, whose support's distribution is then undefined) and no gradient.
        bias: optional ``[V]``.
        response_mask: optional, shaped like ``hidden.shape[:-1]``: only its rows go through the vocabulary
            (found on the host for eager CPU tensors; on a GPU and under torch.compile every row runs, the others'
            hidden states as 0); the others give log-probs 0, ids 0 (or the ids given) and no gradient.
        temperature, softcap, logit_scale: the logit pipeline (``softcap=None`` is off).
        renormalize: the log-probs of the distribution renormalised over the support (they sum to 1 over it)
            instead of the vocabulary's.

    Returns:
        :class:`TopKSupport` ``(logprobs, ids)``, each ``[..., K]``.
    """
    hidden, weight, bias, _ = _dtensor.head(hidden, weight, bias)
    check_head(hidden, weight, bias)
    inv_t, cap, scale = check_logit_options(temperature, softcap, logit_scale)
    renormalize = _validate.boolean("renormalize", renormalize)
    V = weight.shape[0]
    lead = tuple(hidden.shape[:-1])
    if (k is None) == (ids is None):
        raise ValueError("give exactly one of k (the top-k support) and ids (a support given)")
    if k is not None:
        k = _validate.at_least("k", k)
        if k > V:
            raise ValueError(f"k must be at most the vocabulary size {V} (weight.shape[0]), got {k}")
    else:
        _validate.integer("ids", ids)
        if tuple(ids.shape[:-1]) != lead or ids.dim() != len(lead) + 1 or ids.shape[-1] == 0:
            raise ValueError(f"ids must have shape {lead + ('K',)} (hidden.shape[:-1] plus a support of K >= 1), "
                             f"got {tuple(ids.shape)}")
        _validate.like(tuple(ids.shape), "", device=hidden.device, device_of="hidden", kind="integer", ids=ids)
    _validate.like(lead, "like hidden.shape[:-1]", kind="real", device=hidden.device, device_of="hidden",
                   response_mask=response_mask)

    h2 = hidden.reshape(-1, hidden.shape[-1])
    ids2 = None if ids is None else ids.reshape(-1, ids.shape[-1]).to(torch.int64)
    keep = None if response_mask is None else response_mask.reshape(-1) != 0
    rows = None
    if keep is not None and keep.device.type == "cpu" and eager(keep):
        rows = keep.nonzero().squeeze(1)  # a CPU tensor: read on the host for free
    elif keep is not None:
        h2 = torch.where(keep[:, None], h2, torch.zeros((), dtype=h2.dtype, device=h2.device))
    lp, support = TopKLogprobs.apply(h2, weight, bias, ids2, k or 0, rows, scale, cap, inv_t, renormalize)
    if keep is not None and rows is None:
        lp = torch.where(keep[:, None], lp, 0.0)
        if ids is None:
            support = torch.where(keep[:, None], support, 0)
    K = lp.shape[-1]
    return TopKSupport(lp.reshape(lead + (K,)), support.reshape(lead + (K,)))
