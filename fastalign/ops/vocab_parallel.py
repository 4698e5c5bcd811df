"""Vocabulary parallelism: ``fastalign::linear_stats`` on one shard of the vocabulary per rank.

Each rank holds rows ``[start, start + V_r)`` of the weight; labels are global ids. Shards may differ in
size (``torch.chunk`` and FSDP2 give the last ranks fewer rows): one all-reduce of the sizes gives each
rank its ``start`` and the whole vocabulary, as device tensors; it also carries the sizes and options every rank
must share (rows, hidden size, low-rank rank; the statistics asked for, temperature, softcap, logit scale and
ignore_index: :func:`alike_options`), compared on the host for CPU tensors (:func:`shard_range`). The shards are
vocabulary pieces, merged across ranks by :func:`~fastalign.ops.vocab_pieces.merge_pieces` with
all-reduces as the reductions; backward needs only the merged per-token statistics, so the local
backward op runs unchanged and d(hidden) is summed over ranks (hidden is replicated). The mean logit over the
whole vocabulary is the sum of the shards' ``V_r mean_r`` over ``V``; its gradient reaches each shard's mean as
``g V_r / V``. A low-rank term
``a @ L.T`` has its ``L`` sharded like the weight and its ``a`` replicated like hidden: d(a) is summed too.
"""
from __future__ import annotations

import math
import struct
from typing import Union

import torch
from torch import Tensor

from fastalign.ops._launch import eager, linear_outputs, save_for_backward
from fastalign.ops.linear_stats import linear_stats, linear_stats_backward
from fastalign.ops.vocab_pieces import PIECE_IGNORE, local_labels, log_mass, merge_pieces


class AcrossRanks:
    """Pieces spread over the ranks of ``group``, one ``[N]`` tensor each: the reductions of
    :func:`~fastalign.ops.vocab_pieces.merge_pieces` as all-reduces (the sums in one call)."""

    def __init__(self, group):
        self.group = group

    def max(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def sum(self, *ts: Tensor) -> tuple[Tensor, ...]:
        import torch.distributed as dist

        packed = torch.stack(ts)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return tuple(packed.unbind(0))


def refuse_empty_shard_when_traced(v_local: int, op: str, *tensors: Tensor) -> None:
    """An empty vocabulary shard under ``torch.compile`` is refused at tracing: the compiler moves or repeats the
    constant collectives of such a rank (a hang, or a gloo abort), so eager mode is the only safe one there."""
    if v_local == 0 and not eager(*tensors):
        raise ValueError(f"{op}(vocab_group=) under torch.compile needs a non-empty vocabulary shard on every rank; "
                         "this rank's shard has 0 ids (run it eagerly, or shard the vocabulary so that every rank "
                         "holds some)")


def alike_options(statistics: dict[str, bool], ignore_index: int, **numbers: float) -> dict[str, Union[int, float]]:
    """The options every rank of ``vocab_group`` must share, for :func:`shard_range`'s ``same``: which
    ``statistics`` are asked for (one bit each: a rank asking for others sizes its merge otherwise, a crash, or
    merges one statistic into another), ``ignore_index`` and the logit pipeline's ``numbers`` (ranks that differ
    would merge the pieces of different distributions into silently wrong numbers)."""
    where = "on every rank of vocab_group"
    names = list(statistics)
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    bits = " + ".join(str(1 << i) for i in range(len(names)))
    same = {f"{listed} must be asked for alike {where} ({bits} for each on)":
            sum(int(bool(on)) << i for i, on in enumerate(statistics.values())),
            f"ignore_index must be the same {where}": int(ignore_index)}
    same.update({f"{name} must be the same {where}": float(value) for name, value in numbers.items()})
    return same


def _bits(value: Union[int, float]) -> int:
    """An int as it is, a float as its float64 bit pattern: what the all-reduce of :func:`shard_range` carries."""
    return struct.unpack("<q", struct.pack("<d", value))[0] if isinstance(value, float) else value


def _from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def shard_range(v_local: int, group, device, same: dict[str, Union[int, float]]) -> tuple[Tensor, Tensor]:
    """This rank's first vocabulary id and the whole vocabulary's size (0-dim int64 tensors on ``device``),
    from every rank's shard size ``v_local``, summed in one all-reduce (rank r writes its size at column r).

    The same all-reduce carries ``same``: sizes and options every rank must share (its number of rows, hidden
    size, ...; a float option as its bits), each keyed by the message of a mismatch (each later collective is
    sized by them; a mismatch crashes or hangs there). On the CPU (gloo), in eager mode, the sizes are read (free)
    and a mismatch raises a ``ValueError`` on every rank alike; a GPU's are not read (that would synchronise with
    the host), nor traced ones (``torch.compile``, fake tensors)."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    sizes = torch.zeros(1 + len(same), dist.get_world_size(group), dtype=torch.int64, device=device)
    for i, n in enumerate((v_local, *same.values())):
        sizes[i, rank] = _bits(n)
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    if sizes.device.type == "cpu" and eager(sizes):  # a GPU's sizes are not read: that would synchronise
        if not sizes[0].any():
            raise ValueError("vocab_group: every rank's vocabulary shard is empty (the whole vocabulary has 0 ids)")
        for (message, value), row in zip(same.items(), sizes[1:].tolist()):
            if any(n != row[0] for n in row):
                shown = [_from_bits(n) for n in row] if isinstance(value, float) else row
                raise ValueError(f"{message}, got {shown} (one per rank)")
    return sizes[0, :rank].sum(), sizes[0].sum()


def _empty_shard_stats(n: int, device, want_ent: bool, want_sp2: bool, want_amax: bool,
                       want_mean: bool) -> tuple[Tensor, ...]:
    """The local statistics of an empty shard, a piece with no mass (``lse = -inf``) that the merge weighs 0, as
    :func:`~fastalign.ops.linear_stats.linear_stats` returns them for ``n`` rows."""
    lp, ent, sp2, amax, amax_val, lse, mean, log_c = linear_outputs(n, device, want_ent, want_sp2, want_amax,
                                                                     want_mean)
    for t in (lp, ent, sp2, amax, mean, log_c):
        t.zero_()
    return lp, ent, sp2, amax, amax_val.fill_(float("-inf")), lse.fill_(float("-inf")), mean, log_c


def global_argmax(amax: Tensor, amax_val: Tensor, start: Tensor, v_total: Tensor, group) -> Tensor:
    """The whole row's argmax (global id) from each shard's local ``amax`` and its logit ``amax_val``: the largest
    logit over the ranks, the lowest id among its ties (as ``torch.argmax``), in a MAX then a MIN all-reduce. A NaN
    ``amax_val`` (a shard whose logits are only -inf and NaN reports its column 0, which may hold the NaN) counts
    as -inf, so a row with no logit above -inf gives id 0, as a whole row does."""
    import torch.distributed as dist

    own = torch.where(amax_val.isnan(), float("-inf"), amax_val)
    best = own.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    cand = torch.where(own == best, amax + start, v_total.to(amax.dtype).expand_as(amax))
    dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
    return cand


class VocabParallelStats(torch.autograd.Function):
    """Statistics of hidden states against a vocabulary sharded over ``group`` (module docstring).

    Forward: local statistics with local labels, then the merge across ranks (max of lse, sum of the
    exp mass, one sum of the mass-weighted entropy / sum p^2 terms and of the label logit), and max /
    min all-reduces for the argmax. Backward: the local backward op with the merged statistics and
    the merged lse's rounding (``log c``, at the rows with ``|lse| >= 32``); d(hidden) summed over ranks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, low_rank_hidden, low_rank_weight, labels, group, scale, softcap, inv_t,
                ignore_index, want_ent, want_sp2, want_amax, backend, nc, vc, skip, want_mean=False):
        V_r = weight.shape[0]
        refuse_empty_shard_when_traced(V_r, "linear_logprobs", hidden, weight, labels)
        rank_r = 0 if low_rank_hidden is None else low_rank_hidden.shape[-1]
        start, v_total = shard_range(V_r, group, hidden.device, {
            "hidden/labels must have the same number of rows on every rank of vocab_group": hidden.shape[0],
            "hidden must have the same hidden size on every rank of vocab_group": hidden.shape[-1],
            "low_rank must be given on every rank of vocab_group or on none, with the same rank r (0: not given)":
                rank_r,
            **alike_options(dict(entropy=want_ent, sum_p2=want_sp2, argmax=want_amax, mean_logit=want_mean),
                            ignore_index, temperature=1.0 / inv_t, logit_scale=scale, softcap=softcap)})
        yl = local_labels(labels, start, start + V_r, ignore_index)
        if V_r == 0:
            lp, ent, sp2, amax, amax_val, lse, mean, log_c = _empty_shard_stats(
                hidden.shape[0], hidden.device, want_ent, want_sp2, want_amax, want_mean)
        else:
            lp, ent, sp2, amax, amax_val, lse, mean, log_c = linear_stats(
                hidden, weight, bias, low_rank_hidden, low_rank_weight, yl, scale, softcap, inv_t, PIECE_IGNORE,
                want_ent, want_sp2, want_amax, backend, nc, vc, skip, want_mean)
        ignored = labels == ignore_index
        inside = (labels >= start) & (labels < start + V_r) & ~ignored
        # the label's logit lp + lse; -inf where every logit of the shard is -inf (lp = -inf - -inf would be NaN)
        label_logit = torch.where(inside, torch.where(lse == -math.inf, lse, lp + lse), 0.0)
        extra = (label_logit, mean * V_r) if want_mean else (label_logit,)  # the shard's sum of logits
        # each shard's mass relative to its fp32 lse is c (log c: the rounding of that lse, 0 below |lse| = 32)
        M, log_S, m_ent, m_sp2, (m_label_logit, *z_sum) = merge_pieces(
            lse, log_c, ent if want_ent else None, sp2 if want_sp2 else None, extra=extra, over=AcrossRanks(group))
        g_lse = M + log_S
        g_log_c = log_mass(M, log_S, g_lse, labels, ignore_index)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = (labels >= 0) & (labels < v_total)
        g_lp = torch.where(ignored, zero, torch.where(valid, m_label_logit - g_lse, float("nan")))
        g_lse = torch.where(ignored, zero, g_lse)
        g_ent = torch.where(ignored, zero, m_ent) if want_ent else ent
        g_sp2 = torch.where(ignored, zero, m_sp2) if want_sp2 else sp2
        g_mean = torch.where(ignored, zero, z_sum[0] / v_total) if want_mean else mean
        g_amax = amax
        if want_amax:
            g_amax = global_argmax(amax, amax_val, start, v_total, group)
        save_for_backward(ctx, hidden, weight, bias, low_rank_hidden, low_rank_weight, yl, g_lse, g_ent, g_sp2,
                              g_log_c)
        ctx.group = group
        ctx.mean_share = V_r / v_total if want_mean else None  # d mean / d mean_r
        ctx.args = (scale, softcap, inv_t, PIECE_IGNORE, backend, nc, vc, skip)
        ctx.mark_non_differentiable(g_amax)
        ctx.set_materialize_grads(False)
        return g_lp, g_ent, g_sp2, g_amax, g_mean

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_sp2, _g_amax, g_mean):
        import torch.distributed as dist

        hidden, weight, bias, a, lw, yl, lse, ent, sp2, log_c = ctx.saved_tensors
        low_rank = None if a is None else (a, lw)
        need = ctx.needs_input_grad
        if g_lp is None and g_ent is None and g_sp2 is None and g_mean is None:
            return (None,) * 19
        empty = weight.shape[0] == 0
        # every rank takes part in the all-reduce of d(hidden) (and d(a)): both are computed on every rank
        if empty:  # an empty shard adds nothing to d(hidden) and d(a)
            dh, dw, db, da, dl = (None if t is None else torch.zeros_like(t) for t in (hidden, weight, bias, a, lw))
        else:
            dh, dw, db, da, dl = linear_stats_backward(
                g_lp, g_ent, g_sp2, hidden, weight, bias, a, lw, yl, lse, ent, sp2, *ctx.args, True, bool(need[1]),
                bool(bias is not None and need[2]), low_rank is not None, log_c,
                None if g_mean is None or ctx.mean_share is None else g_mean * ctx.mean_share)
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        if low_rank is not None:
            dist.all_reduce(da, op=dist.ReduceOp.SUM, group=ctx.group)
        present = (True, True, bias is not None, low_rank is not None, low_rank is not None)
        return (*(g if n and p else None for g, n, p in zip((dh, dw, db, da, dl), need, present)),
                *((None,) * 14))
