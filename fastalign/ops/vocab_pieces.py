"""Statistics of disjoint vocabulary pieces: labels inside a piece, the one merge of the pieces'
statistics into the whole row's, and the mass backward renormalises by.

A row's vocabulary is cut into pieces k (chunks on the CPU, splits in the Triton kernels, shards
across ranks for vocabulary parallelism). With each piece given as its max ``m_k`` and
``log s_k = log sum_{j in k} exp(z_j - m_k)`` (so ``lse_k = m_k + log s_k``), ``M = max_k m_k``,
``u_k = (m_k - M) + log s_k`` the log of the piece's mass relative to ``exp(M)`` and
``pi_k = exp(u_k) / S``, ``S = sum_k exp(u_k)``, the piece's share of the row's mass:

    lse = M + log S,  H = sum_k pi_k (H_k - log pi_k),  sum_p2 = sum_k pi_k^2 sum_p2_k
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class StackedPieces:
    """Pieces stacked along dim 0 of ``[K, N]`` tensors: the reductions of :func:`merge_pieces`."""

    @staticmethod
    def max(t: Tensor) -> Tensor:
        return t.max(0).values

    @staticmethod
    def sum(*ts: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.sum(0) for t in ts)


def merge_pieces(m: Tensor, log_s: Tensor, ent: Optional[Tensor], sp2: Optional[Tensor], extra: tuple = (),
                 over=StackedPieces):
    """Merge the statistics of disjoint vocabulary pieces (module docstring) into the row's:
    ``(M, log S, entropy, sum_p2, sums of extra)`` with ``lse = M + log S``.

    ``over`` reduces across the pieces: :class:`StackedPieces` (``[K, N]`` in, ``[N]`` out) or, for
    vocabulary shards, all-reduces across ranks (``over.sum`` gets every tensor to sum at once, so
    that ``extra`` terms share one reduction). Only differences from ``M`` are summed, so
    ``(z_y - M) - log S`` is a log-prob exact to its own fp32 rounding at any logit scale. A piece
    with no mass (all logits -inf: ``m_k = -inf``) gets weight 0; a row of only such pieces gives
    ``log S = -inf`` and NaN entropy and sum_p2, as does a row with a NaN logit (as one piece would). The
    entropy is clamped at 0 (its terms of a near one-hot row cancel to a rounding that may fall below 0).
    """
    M = over.max(m)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    u = (m - M) + log_s
    w = torch.exp(u)
    (s,) = over.sum(w)
    log_S = torch.log(s)
    pi = w / s
    terms = []
    massless = pi == 0  # only such a piece is dropped; a NaN share (a NaN row, or a row with no mass) stays NaN
    if ent is not None:
        log_pi = torch.where(massless, torch.zeros_like(pi), u - log_S)
        terms.append(torch.where(massless, torch.zeros_like(pi), pi * (ent - log_pi)))
    if sp2 is not None:
        terms.append(torch.where(massless, torch.zeros_like(pi), pi * pi * sp2))
    sums = list(over.sum(*terms, *extra)) if terms or extra else []
    # an entropy is >= 0; the fp32 sum of a near one-hot row's terms cancels to a rounding either side of 0
    out_ent = sums.pop(0).clamp_min(0.0) if ent is not None else None
    out_sp2 = sums.pop(0) if sp2 is not None else None
    return M, log_S, out_ent, out_sp2, tuple(sums)


# Labels as the row kernels see them inside one vocabulary piece: a local id in [0, v1 - v0),
# PIECE_IGNORE for an ignored row, PIECE_ELSEWHERE for a label in another piece (or out of range).
# Both are negative, so no local id can ever be mistaken for an ignored row, whatever ignore_index.
PIECE_IGNORE = -1
PIECE_ELSEWHERE = -2


def check_labels(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ``ValueError`` if a label is outside ``[0, vocab)`` and not ``ignore_index`` (read on the host)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")


def local_labels(labels: Tensor, v0: int, v1: int, ignore_index: int) -> Tensor:
    """Labels relative to the vocabulary piece [v0, v1), for kernels run with ``PIECE_IGNORE``."""
    inside = (labels >= v0) & (labels < v1)
    local = torch.where(inside, labels - v0, PIECE_ELSEWHERE)
    return torch.where(labels == ignore_index, PIECE_IGNORE, local).contiguous()


# |lse| from which backward renormalises a row (as the C++ token_stats backward): the saved fp32
# lse is off by up to ulp(lse) / 2, which reaches 2^-20 at 32 (and 5e-4 at 1e4).
RENORMALISE_ABOVE = 32.0


def far_rows(lse: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Rows backward renormalises: labelled, with ``RENORMALISE_ABOVE <= |lse| < inf`` (a row of no mass,
    ``lse = -inf``, is a vocabulary piece that merges with weight 0, and has nothing to renormalise)."""
    return (lse.abs() >= RENORMALISE_ABOVE) & torch.isfinite(lse) & (labels != ignore_index)


def log_mass(M: Tensor, log_S: Tensor, lse: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``log c = log sum_j exp(z_j / T - lse)`` on the :func:`far_rows`, 0 elsewhere: the correction backward
    applies to ``log p``, from the forward's own ``M`` (its reference logit) and ``log S`` (the log of the row's
    mass relative to it), with ``lse`` their sum rounded to fp32: ``log c = (M - lse) + log S``, the difference
    formed in float64, where it is exact. So ``log c`` is the saved lse's rounding error, known to the rounding of
    ``log S``, and the backward needs no other pass over the logits to remove it."""
    c = (M.double() - lse.double()) + log_S.double()
    return torch.where(far_rows(lse, labels, ignore_index), c.float(), 0.0).contiguous()
