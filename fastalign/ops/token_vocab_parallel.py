r"""Vocabulary parallelism on logits: ``fastalign::token_stats`` on one shard of every row per rank.

Rank ``r`` of ``group`` holds the logits of the global ids ``[start_r, start_r + V_r)`` (Megatron's layout; shards
may differ in size, or be empty); labels are global ids, the same on every rank. With ``x = z / T``, the local pass
gives the shard's statistics as a vocabulary piece (``lse_r``; the entropy ``H_r`` and ``S_r = sum p_r^2`` of its
own softmax ``p_r``; its argmax) and the rank that holds the label reads ``x_y``;
:func:`~fastalign.ops.vocab_pieces.merge_pieces` combines them with all-reduces::

    lse = log sum_r exp(lse_r)      c_r = exp(lse_r - lse)   (the shard's share: p_j = c_r p_rj)
    logprob = x_y - lse             H = sum_r c_r (H_r - log c_r)      S = sum_r c_r^2 S_r

Backward needs no collective: it runs the local backward kernel on the shard's own statistics, at per-row
gradients chosen so that it writes the whole vocabulary's gradient. For ``j`` on rank ``r`` and upstream
gradients ``g_lp, g_H, g_S``::

    dx_j = g_lp ([j = y] - p_j) - g_H p_j (log p_j + H) + 2 g_S p_j (p_j - S)
         = a ([j = y] - p_rj) - b p_rj (log p_rj + H_r) + 2 s p_rj (p_rj - S_r)  +  (g_lp - a) [j = y]

    b = g_H c_r     s = g_S c_r^2     a = c_r (g_lp + g_H (log c_r + H - H_r) + 2 g_S (S - c_r S_r))

The kernel writes the first line's local form (its own renormalisation keeps ``p_r`` exact at any logit scale);
the label's element is then written in fp32 from the merged statistics. A shard with no mass on a row (every
logit -inf) has ``c_r = 0`` and a zero gradient there, as the whole row's softmax gives it.

Precision: each shard's fp32 ``lse_r`` is rounded once, to ``ulp(lse_r) / 2``, and the merge weighs the shards by
their differences, so the merged statistics carry an absolute error of about ``ulp(|x|)`` where two shards hold
comparable mass: below 1e-5 for ``|x| < 100`` (LLM logits at a usual temperature), 1e-3 at ``|x| ~ 1e4``. One
process's pass is exact to its own rounding at any scale.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastalign.ops._launch import refuse_second_derivative, runs_directly, save_for_backward, stat_outputs
from fastalign.ops.token_stats import token_stats_backward, token_stats_backward_, token_stats_call
from fastalign.ops.vocab_parallel import (AcrossRanks, alike_options, global_argmax, refuse_empty_shard_when_traced,
                                         shard_range)
from fastalign.ops.vocab_pieces import PIECE_IGNORE, check_labels, local_labels, merge_pieces


def _shard_stats(rows: Tensor, yl: Tensor, inv_t: float, want_ent: bool, want_sp2: bool, want_amax: bool,
                 backend: str):
    """(lse_r, log c_r, H_r, S_r, argmax_r) of this rank's shard (log c_r: the rounding of lse_r that the local
    backward removes); an empty shard is a piece with no mass."""
    n = rows.shape[0] * rows.shape[1]
    if rows.shape[2] == 0:
        _lp, ent, sp2, amax, lse = stat_outputs(n, rows.device, want_ent, want_sp2, want_amax)
        return lse.fill_(-math.inf), torch.zeros_like(lse), ent.zero_(), sp2.zero_(), amax.zero_()
    _lp, ent, sp2, amax, lse, log_c = token_stats_call(rows, yl, inv_t, PIECE_IGNORE, want_ent, want_sp2, want_amax,
                                                       backend, False)
    return lse, log_c, ent, sp2, amax


class VocabParallelTokenStats(torch.autograd.Function):
    """Statistics of logits whose vocabulary is sharded over ``group`` (module docstring): ``rows`` is this rank's
    ``[outer, inner, V_r]`` view, ``labels`` the global ids ``[outer * inner]`` (int64, contiguous)."""

    @staticmethod
    def forward(ctx, rows, labels, group, inv_t, ignore_index, want_ent, want_sp2, want_amax, backend, inplace,
                check=False):
        V_r = rows.shape[2]
        refuse_empty_shard_when_traced(V_r, "token_logprobs", rows, labels)
        start, v_total = shard_range(V_r, group, rows.device, {
            "logits/labels must have the same number of rows on every rank of vocab_group": labels.shape[0],
            **alike_options(dict(entropy=want_ent, sum_p2=want_sp2, argmax=want_amax, check=check), ignore_index,
                            temperature=1.0 / inv_t)})
        if check:  # the labels against the whole vocabulary, read on the host (every rank holds the same labels)
            check_labels(labels, int(v_total), ignore_index)
        yl = local_labels(labels, start, start + V_r, ignore_index)
        lse_r, log_c_r, ent_r, sp2_r, amax_r = _shard_stats(rows, yl, inv_t, want_ent, want_sp2, want_amax, backend)
        owned = yl >= 0  # the label is in this shard
        y_col = torch.where(owned, yl, 0).view(rows.shape[0], rows.shape[1], 1)
        x_y = torch.where(owned, rows.gather(2, y_col).view(-1).float() * inv_t, 0.0) if V_r else lse_r.new_zeros(
            lse_r.shape)
        M, log_S, ent, sp2, (x_y,) = merge_pieces(lse_r, torch.zeros_like(lse_r), ent_r if want_ent else None,
                                                  sp2_r if want_sp2 else None, extra=(x_y,),
                                                  over=AcrossRanks(group))
        ignored = labels == ignore_index
        valid = (labels >= 0) & (labels < v_total)
        lse = M + log_S
        lp = torch.where(ignored, 0.0, torch.where(valid, (x_y - M) - log_S, math.nan))
        ent = torch.where(ignored, 0.0, ent) if want_ent else ent_r
        sp2 = torch.where(ignored, 0.0, sp2) if want_sp2 else sp2_r
        amax = amax_r
        if want_amax:
            best = rows.gather(2, amax_r.view(y_col.shape)).view(-1).float() if V_r else torch.full_like(
                lse_r, -math.inf)
            amax = global_argmax(amax_r, best, start, v_total, group)
        save_for_backward(ctx, rows, yl, lse_r, log_c_r, ent_r, sp2_r, lse, lp, ent, sp2)
        ctx.args = (inv_t, backend, inplace)
        ctx.mark_non_differentiable(amax)
        ctx.set_materialize_grads(False)
        return lp, ent, sp2, amax

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_sp2, _g_amax):
        refuse_second_derivative("token statistics over a sharded vocabulary")
        rows, yl, lse_r, log_c_r, ent_r, sp2_r, lse, lp, ent, sp2 = ctx.saved_tensors
        inv_t, backend, inplace = ctx.args
        g_ent = g_ent if ent_r.numel() else None
        g_sp2 = g_sp2 if sp2_r.numel() else None
        if rows.shape[2] == 0 or (g_lp is None and g_ent is None and g_sp2 is None):
            return (None if rows.shape[2] else torch.zeros_like(rows),) + (None,) * 10
        log_c = lse_r - lse
        c = torch.exp(log_c)
        zero = torch.zeros_like(c)
        # the kernel's per-row gradients a, b, s (module docstring) and, at the label, the whole row's d x_y
        a = g_lp.float() if g_lp is not None else zero
        p_y = torch.exp(lp)
        d_y = a * (1.0 - p_y)
        if g_ent is not None:
            a = a + g_ent * torch.where(c == 0, 0.0, log_c + ent - ent_r)
            d_y = d_y - g_ent * torch.where(p_y == 0, 0.0, p_y * (lp + ent))
            g_ent = (g_ent * c).contiguous()
        if g_sp2 is not None:
            a = a + 2.0 * g_sp2 * (sp2 - c * sp2_r)
            d_y = d_y + 2.0 * g_sp2 * p_y * (p_y - sp2)
            g_sp2 = (g_sp2 * c * c).contiguous()
        a = (a * c).contiguous()
        # a shard with no mass on a row writes zeros there (its p_r, from lse_r = -inf, is not defined)
        yb = torch.where(c == 0, PIECE_IGNORE, yl)
        args = (a, g_ent, g_sp2, rows, yb, lse_r, log_c_r, ent_r, sp2_r, inv_t, PIECE_IGNORE, backend)
        if inplace:
            token_stats_backward_(*args)
            grad = rows
        else:
            grad = token_stats_backward.direct(*args) if runs_directly(backend, rows, yb) else token_stats_backward(
                *args)
        owned = (yl >= 0).view(rows.shape[0], rows.shape[1], 1)  # the label's element, even where c_r = 0
        y_col = torch.where(owned, yl.view(owned.shape), 0)
        at_y = (d_y * inv_t).view(owned.shape).to(grad.dtype)
        grad.scatter_(2, y_col, torch.where(owned, at_y, grad.gather(2, y_col)))
        return grad, None, None, None, None, None, None, None, None, None, None
