r"""Divergences over a support of a few token ids per row (TRL's top-k distillation objectives), from the two
models' log-probs there (:func:`fastalign.linear_topk_logprobs`).

A support holds ``K`` ids per row, some of them possibly masked out (a duplicate in a union of two top-k sets).
TRL compares the models over it in one of two forms: renormalised over the support, ``lp_j - logsumexp_S lp``,
or with one more category for the mass outside it (the tail bucket), ``log(1 - exp(min(logsumexp_S lp, -1e-7)))``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def on_support(logprobs: Tensor, mask: Optional[Tensor], add_tail: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``(log-probs, mask)`` of the support's categories: masked ids at ``-inf``, then renormalised over the
    support, or with the tail bucket appended (its mask entry True)."""
    if mask is not None:
        logprobs = logprobs.masked_fill(~mask, -math.inf)
    if not add_tail:
        return logprobs - torch.logsumexp(logprobs, -1, keepdim=True), mask
    captured = torch.logsumexp(logprobs, -1, keepdim=True).clamp(max=-1e-7)
    logprobs = torch.cat([logprobs, torch.log(-torch.expm1(captured))], -1)
    return logprobs, None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[:-1] + (1,))], -1)


def support_divergence(student: Tensor, teacher: Tensor, beta: float, mask: Optional[Tensor] = None) -> Tensor:
    r"""The generalized JSD over the last dimension of the two models' log-probs ``[..., K]`` on a support
    (:func:`on_support`): ``KL(t || s)`` at ``beta = 0``, ``KL(s || t)`` at 1, else ``(1 - beta) KL(s || m) + beta
    KL(t || m)`` with ``m = (1 - beta) p_s + beta p_t``. Categories where ``mask`` is False add nothing (and no
    gradient: their log-probs enter as 0)."""
    if mask is not None:
        student, teacher = (torch.where(mask, x, 0.0) for x in (student, teacher))
    p_s, p_t = student.exp(), teacher.exp()
    if mask is not None:
        p_s, p_t = (torch.where(mask, p, 0.0) for p in (p_s, p_t))
    if beta == 0.0:
        terms = p_t * (teacher - student)
    elif beta == 1.0:
        terms = p_s * (student - teacher)
    else:
        log_m = torch.logaddexp(student + math.log1p(-beta), teacher + math.log(beta))
        terms = (1.0 - beta) * p_s * (student - log_m) + beta * p_t * (teacher - log_m)
    return terms.sum(-1)
