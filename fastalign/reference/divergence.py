"""Reference for docs/math.md#distillation-divergence: the generalized Jensen-Shannon divergence or the total
variation distance between a student's and a teacher's next-token distributions, or the cosine distance of their
logits, from logits or from hidden states; and for docs/math.md#elementwise-divergence, the terms of a divergence
between given (log-)probabilities."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastalign.reference.linear import linear_logits


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, temperature: float = 1.0,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Per-row divergence ``D [...]`` of ``p_s = softmax(z_s / T)`` from ``p_t = softmax(z_t / T)``:

    * ``beta = 0``: :math:`KL(p_t \| p_s)`;  ``beta = 1``: :math:`KL(p_s \| p_t)`;
    * else, with :math:`m = (1 - \beta) p_s + \beta p_t`:
      :math:`\beta\,KL(p_t \| m) + (1 - \beta)\,KL(p_s \| m)`.

    Terms with a zero probability contribute 0 (``0 log 0 = 0``); a NaN probability gives NaN."""
    lps = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lpt = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)

    def kl(lp, lq):  # KL(p || q) summed over the vocabulary
        p = lp.exp()
        return torch.where(p == 0, torch.zeros_like(p), p * (lp - lq)).sum(-1)  # NaN stays NaN

    if beta == 0:
        return kl(lpt, lps)
    if beta == 1:
        return kl(lps, lpt)
    lm = torch.logaddexp(lps + math.log(1 - beta), lpt + math.log(beta))
    return beta * kl(lpt, lm) + (1 - beta) * kl(lps, lm)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-row ``1/2 sum_j |p_s,j - p_t,j|`` of ``p = softmax(z / T)`` (the subgradient 0 where they are equal)."""
    ps = torch.softmax(student_logits.to(dtype) / temperature, dim=-1)
    pt = torch.softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return 0.5 * (ps - pt).abs().sum(-1)


def cosine_distance(student_logits: Tensor, teacher_logits: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-row ``1 - cos(z_s, z_t)``, each row scaled to unit length with its norm floored at 1e-12 (torch's
    ``F.normalize``; a zero row has cosine 0). A temperature scales both rows alike and changes only which rows
    are below the floor."""
    a = torch.nn.functional.normalize(student_logits.to(dtype), dim=-1, eps=1e-12)
    b = torch.nn.functional.normalize(teacher_logits.to(dtype), dim=-1, eps=1e-12)
    return 1 - (a * b).sum(-1)


def elementwise_terms(x: Tensor, y: Tensor, *, divergence: str, beta: float = 0.5, log_target: bool = False,
                      eps: float = 1e-10, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""The terms ``f(x_j, y_j)`` of :func:`fastalign.elementwise_divergence`, ``x``'s shape; differentiate them
    in ``x`` for its gradient (each term depends on its own element alone).

    * ``"jsd"`` (log-probabilities; ``p = e^y``, ``q = e^x``): ``p (y - x)`` at ``beta = 0``, ``q (x - y)`` at 1,
      else ``beta p (y - lm) + (1 - beta) q (x - lm)``, ``lm = log(beta p + (1 - beta) q)``; a zero probability
      adds 0.
    * ``"kl"``: ``y (log max(y, eps) - x)``, or ``e^y (y - x)`` with ``log_target`` (torch's ``kl_div`` terms).
    * ``"tvd"`` (probabilities): ``|x - y| / 2``."""
    x, y = x.to(dtype), y.to(dtype)

    def weighted(w, d):  # w d, 0 where w is 0
        return torch.where(w == 0, torch.zeros_like(w), w * d)

    if divergence == "kl":
        return y.exp() * (y - x) if log_target else y * (torch.log(y.clamp_min(eps)) - x)
    if divergence == "tvd":
        return 0.5 * (x - y).abs()
    p, q = y.exp(), x.exp()
    if beta == 0:
        return weighted(p, y - x)
    if beta == 1:
        return weighted(q, x - y)
    lm = torch.log(beta * p + (1 - beta) * q)
    return weighted(beta * p, y - lm) + weighted((1 - beta) * q, x - lm)


def entropy(logits: Tensor, *, temperature: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-row entropy of ``softmax(z / T)``."""
    lp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    p = lp.exp()
    return -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)


def divergence_loss(student_logits: Tensor, teacher_logits: Tensor, *, divergence: str = "jsd",
                    beta: Optional[float] = None, temperature: float = 1.0, response_mask: Optional[Tensor] = None,
                    global_tokens=None, labels: Optional[Tensor] = None, ignore_index: int = -100,
                    hard_weight: float = 0.0, soft_weight: float = 1.0, token_weights: Optional[Tensor] = None,
                    agg: str = "token-mean", dtype: torch.dtype = torch.float64):
    """``(loss, metrics)`` of :func:`fastalign.linear_divergence_loss` from logits ``[..., V]``:

        loss = sum_t m_t w_t (soft_weight * D_t + hard_weight * NLL_t) / global_tokens

    (``w`` the ``token_weights``, 1 without; ``agg="seq-mean-token-mean"``: logits ``[B, T, V]``, each row's sum
    over its own ``max(sum_t m_t, 1)``, then the mean over the ``B`` rows)
    ``D`` the generalized JSD (:func:`generalized_jsd`, ``beta`` 0.5 when None), with ``divergence="tvd"``
    :func:`total_variation`, with ``divergence="cosine"`` :func:`cosine_distance`, ``m`` the mask
    (``response_mask``, or ``labels != ignore_index``), ``global_tokens`` by default ``max(sum m, 1)``,
    ``NLL_t = -log softmax(z_s)_{y_t}`` at temperature 1 (Liger's hard loss).
    ``metrics``: ``divergence_sum``, ``entropy_sum`` (student entropy at the temperature), ``nll_sum``
    and ``num_tokens``, over the scored rows."""
    if divergence == "cosine":
        d = cosine_distance(student_logits.to(dtype) / temperature, teacher_logits.to(dtype) / temperature,
                            dtype=dtype)
    elif divergence == "tvd":
        d = total_variation(student_logits, teacher_logits, temperature=temperature, dtype=dtype)
    else:
        d = generalized_jsd(student_logits, teacher_logits, beta=0.5 if beta is None else beta,
                            temperature=temperature, dtype=dtype)
    ent = entropy(student_logits, temperature=temperature, dtype=dtype)
    if response_mask is not None:
        m = (response_mask != 0).to(dtype)
    elif labels is not None:
        m = (labels != ignore_index).to(dtype)
    else:
        m = torch.ones(d.shape, dtype=dtype, device=d.device)
    scored = m != 0
    nll = torch.zeros_like(d)
    if labels is not None:
        lp = torch.log_softmax(student_logits.to(dtype), dim=-1)
        labelled = labels != ignore_index
        safe = torch.where(labelled, labels, torch.zeros_like(labels)).long()
        nll = torch.where(labelled & scored, -lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), torch.zeros_like(d))
    d = torch.where(scored, d, torch.zeros_like(d))
    ent = torch.where(scored, ent, torch.zeros_like(ent))
    count = m.sum()
    extra = {}
    if token_weights is not None:
        extra["weighted_divergence"] = torch.where(scored, token_weights.to(dtype) * d, torch.zeros_like(d)).sum() / \
            count.clamp(min=1)
    per_token = soft_weight * d + hard_weight * nll
    if token_weights is not None:
        per_token = torch.where(scored, token_weights.to(dtype) * per_token, torch.zeros_like(per_token))
    if agg == "seq-mean-token-mean":
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    else:
        norm = count.clamp(min=1) if global_tokens is None else torch.as_tensor(global_tokens, dtype=dtype)
        loss = per_token.sum() / norm
    return loss, {"divergence_sum": d.sum(), "entropy_sum": ent.sum(), "nll_sum": nll.sum(), "num_tokens": count,
                  **extra}


def linear_divergence_loss(hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor, *,
                           bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                           logit_scale: float = 1.0, softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
                           teacher_softcap: Optional[float] = None, dtype: torch.dtype = torch.float64, **kw):
    """:func:`divergence_loss` of the materialised logits of both heads (``kw``: its options)."""
    zs = linear_logits(hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale, dtype=dtype)
    zt = linear_logits(teacher_hidden, teacher_weight, bias=teacher_bias, softcap=teacher_softcap,
                       logit_scale=teacher_logit_scale, dtype=dtype)
    return divergence_loss(zs, zt, dtype=dtype, **kw)
