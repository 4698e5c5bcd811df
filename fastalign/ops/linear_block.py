"""One block of rows through the LM head in one pass: logits, statistics, then d(inputs).

When the gradient of a loss with respect to each token log-prob is known as soon as the
statistics of a *block* of rows are (a preference loss over a few whole pairs is), the
block's logits need not be recomputed in a backward pass. Per block:

    z      = softcap(scale * (h @ W.T + a @ L.T + b))            (kept: [rows, V]; a @ L.T optional)
    lp, lse, sum p^2 or H = token_stats(z / T)                   (C++ / Triton row kernels)
    g      = d loss / d lp (and d loss / d H)                    (the caller's, from lp)
    dz     = d loss / d z, written over z in place               (token_stats backward; + g_mean / V for the
                                                                   mean logit's gradient g_mean)
    dh     = dz @ W,   dW += dz.T @ h,   db += sum_rows dz       (da = dz @ L,  dL += dz.T @ a)

three matrix products per block instead of the four of a forward plus a recomputing
backward. The price is the block's logits in memory: the caller sizes the block.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from fastalign.ops._launch import eager
from fastalign.ops.device_compaction import Compaction, scored_order
from fastalign.ops.linear_cpu import chunk_grad_to_inputs, chunk_logits, softcap_derivative
from fastalign.ops.token_stats import backward_into, token_stats


def block_dtype(like: Tensor) -> torch.dtype:
    """The dtype of a block's logits and of the gradients from them: the input dtype on a GPU (tensor-core
    operands), fp32 on the CPU."""
    return like.dtype if like.is_cuda else torch.float32


def block_buffer(rows: int, vocab: int, like: Tensor) -> Tensor:
    """A flat buffer for ``rows x vocab`` logits (:func:`block_dtype`)."""
    return torch.empty(rows * vocab, dtype=block_dtype(like), device=like.device)


def scale_by(t: Tensor, g: Tensor) -> Tensor:
    """``t *= g`` in place, computed in fp32 whatever ``t``'s dtype (a bf16 / fp16 ``t`` rounded once, after the
    product), for a gradient ``g`` of one value (a loss scale, ``1 / accumulation steps``): a one-element fp32
    operand, not a 0-dim one, which an op may first round to ``t``'s dtype."""
    return t.mul_(g.float().reshape(1))


def forward_grads(ctx, g: Tensor, loss: str) -> tuple:
    """The gradients a single pass computed in its forward (``ctx.grads``), each scaled in place by the incoming
    gradient ``g`` (:func:`scale_by`; None kept). Once per forward: they are handed over, and a second backward
    through a retained graph raises a ``RuntimeError`` naming ``loss``."""
    if ctx.grads is None:
        raise RuntimeError(f"the single pass of {loss} can be differentiated once per forward (its gradients are "
                           "computed in the forward); run the forward again, or set single_pass=False (an argument "
                           "of fastalign's losses, an attribute of the Liger drop-ins) to differentiate a retained "
                           "graph more than once")
    grads, ctx.grads = ctx.grads, None
    return tuple(None if d is None else scale_by(d, g) for d in grads)


def zero_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need, dh_dtype: torch.dtype) -> tuple:
    """``(dh, dw, db)`` for a blocked pass to fill: zeros for the inputs in ``need`` (``ctx.needs_input_grad``),
    d(weight) and d(bias) in fp32, d(hidden) in ``dh_dtype``; None for the others."""
    return (torch.zeros(hidden.shape, dtype=dh_dtype, device=hidden.device) if need[0] else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None,
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if bias is not None and need[2] else None)


def _as_operand(t, dtype: torch.dtype):
    """``t`` (a tensor, None or a tuple of them) as it is when of ``dtype``, else in fp32."""
    if isinstance(t, tuple):
        return tuple(_as_operand(x, dtype) for x in t)
    return t if t is None or t.dtype == dtype else t.float()


def _operands(like: Tensor, *tensors):
    """``tensors`` as the block's products take them: as they are when ``like`` (the buffer) has their
    dtype, else in fp32 (None and pairs kept). A module-level function, not a closure that calls itself:
    that closure was a reference cycle holding ``like``, the block's ``[rows, V]`` logits, until the cyclic GC
    ran."""
    return [_as_operand(t, like.dtype) for t in tensors]


#: The statistics a block can give beside the log-prob (``mean_logit``: the mean over the vocabulary of the
#: head's logits ``z``, before the temperature).
BLOCK_STATS = ("entropy", "sum_p2", "argmax", "mean_logit")


def block_logits(buf: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], *, scale: float, softcap: float,
                 low_rank: Optional[tuple[Tensor, Tensor]] = None, live: Optional[Tensor] = None) -> Tensor:
    """The logits ``z = softcap(scale * (h @ W.T + a @ L.T + b))`` of the rows ``h [n, H]`` into ``buf``, the
    operands taken in ``buf``'s dtype or fp32 (:func:`~fastalign.ops.linear_cpu.chunk_logits`); ``low_rank`` and
    ``live`` as in :func:`block_forward`."""
    h, weight, bias, low_rank = _operands(buf, h, weight, bias, low_rank)
    return chunk_logits(buf, h, weight, bias, scale, softcap, low_rank=low_rank, live=live)


def block_forward(buf: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                  scale: float, softcap: float, inv_t: float, ignore_index: int, stats=(), backend: str,
                  low_rank: Optional[tuple[Tensor, Tensor]] = None, live: Optional[Tensor] = None,
                  deriv_buf: Optional[Tensor] = None):
    """Logits of the rows ``h [n, H]`` into ``buf`` and their statistics.

    Returns ``(z, deriv, lp, extra, lse, log_c)``: ``z`` the kept logits, ``deriv`` the softcap
    derivative (None without softcap; written into ``deriv_buf``, a flat buffer like ``buf``, when given,
    so that a loop over blocks holds one), ``extra`` a dict of the ``stats`` asked (names of
    :data:`BLOCK_STATS`) per row, ``log_c`` the rounding of ``lse`` that :func:`block_backward` removes.
    ``low_rank = (a [n, r], L [V, r])`` adds ``a @ L.T`` to the logits.
    ``live``: the labelled rows come first and only those ``live`` rows are multiplied
    (:mod:`~fastalign.ops.device_compaction`)."""
    z = block_logits(buf, h, weight, bias, scale=scale, softcap=softcap, low_rank=low_rank, live=live)
    deriv = None
    if softcap > 0:
        out = None if deriv_buf is None else deriv_buf[:z.numel()].view(z.shape)
        deriv = softcap_derivative(z, softcap, scale, out=out)
    lp, ent, sp2, amax, lse, log_c = token_stats(z.unsqueeze(0), labels, inv_t, ignore_index, "entropy" in stats,
                                                 "sum_p2" in stats, "argmax" in stats, backend, True)
    extra = {"entropy": ent, "sum_p2": sp2, "argmax": amax}
    if "mean_logit" in stats:  # (1/V) sum_j z_j: one read of the block's logits, accumulated in fp32
        extra["mean_logit"] = z.mean(-1, dtype=torch.float32)
    return z, deriv, lp, {name: extra[name] for name in stats}, lse, log_c


def block_backward(z: Tensor, deriv: Optional[Tensor], g_lp: Tensor, h: Tensor, weight: Tensor,
                   labels: Tensor, lse: Tensor, *, log_c: Tensor, scale: float, softcap: float, inv_t: float,
                   ignore_index: int, backend: str, dw: Optional[Tensor], db: Optional[Tensor],
                   g_ent: Optional[Tensor] = None, ent: Optional[Tensor] = None,
                   low_rank: Optional[tuple[Tensor, Tensor]] = None, dl: Optional[Tensor] = None,
                   live: Optional[Tensor] = None, g_mean: Optional[Tensor] = None):
    """Turn the kept logits ``z`` into d(logits) in place for token gradients ``g_lp`` (and ``g_ent`` of
    the entropies ``ent``, ``g_mean`` of the mean logits), given :func:`block_forward`'s ``lse`` and ``log_c``;
    accumulate ``dw``/``db`` (and ``dl`` for
    ``low_rank = (a, L)``) and return
    ``(dh [n, H], da [n, r] or None)`` (fp32 on the CPU, the input dtype on a GPU). ``live``: as in
    :func:`block_forward` (``dh`` and ``da`` are 0 past it). Rows whose label is ``ignore_index`` add nothing
    to ``dw`` and ``dl``, even where their ``h`` (or ``a``) is not finite (their d(logits) is 0, and 0 * NaN is
    not)."""
    if live is None:
        keep = labels != ignore_index
        h = kept_rows(h, keep)
        low_rank = None if low_rank is None else (kept_rows(low_rank[0], keep), low_rank[1])
    empty = lse.new_empty(0)
    z3 = z.unsqueeze(0)
    backward_into(z3, g_lp, g_ent, None, z3, labels, lse, log_c, empty if ent is None else ent, empty, inv_t,
                  ignore_index, backend)
    if g_mean is not None:  # d mean / d z_j = 1 / V at the labelled rows
        z.add_(torch.where(labels != ignore_index, g_mean.float() / z.shape[-1], 0.0)[:, None])  # rounded once
    h, weight, low_rank = _operands(z, h, weight, low_rank)
    dh = torch.empty(h.shape, dtype=z.dtype, device=z.device)
    da = None if low_rank is None else torch.empty(low_rank[0].shape, dtype=z.dtype, device=z.device)
    chunk_grad_to_inputs(z, deriv, scale, softcap, h, weight, dh, dw, db, accumulate=False, low_rank=low_rank,
                         low_rank_grads=(da, dl), live=live)
    return dh, da


def kept_rows(x: Tensor, keep: Tensor) -> Tensor:
    """``x [n, ...]`` with the rows where ``keep [n]`` is False set to 0, so that they add nothing to a product
    even where they are not finite (their d(logits) is 0, and 0 * NaN is not). An eager CPU ``keep`` that is
    all True (read for free there) returns ``x`` itself, without a copy."""
    if keep.device.type == "cpu" and eager(keep) and bool(keep.all()):
        return x
    return torch.where(keep[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def block_rows(vocab: int, like: Tensor, budget_bytes: float) -> int:
    """Rows of logits that fit in ``budget_bytes`` (at least one)."""
    elem = like.element_size() if like.is_cuda else 4
    return max(1, int(budget_bytes // max(vocab * elem, 1)))


class RowBlock(NamedTuple):
    """Positions ``start .. stop-1`` of a scan over the rows of ``[N, ...]`` tensors: those rows (``index``
    None: a slice), or the rows ``index`` (the scan's order at these positions, e.g. the scored rows
    only, or first), gathered with ``index_select`` and put back with ``index_copy_``."""

    start: int
    stop: int
    index: Optional[Tensor] = None

    def take(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """The block's rows of ``t``; None and empty tensors (an absent per-row input) stay as they are."""
        if t is None or t.numel() == 0:
            return t
        return t[self.start:self.stop] if self.index is None else t.index_select(0, self.index)

    def put(self, into: Tensor, rows: Tensor) -> None:
        """Write the block's ``rows`` into ``into`` at their places."""
        if self.index is None:
            into[self.start:self.stop] = rows
        else:
            into.index_copy_(0, self.index, rows)


def row_blocks(n: int, rows: int, order: Optional[Tensor] = None) -> Iterator[RowBlock]:
    """The blocks of ``rows`` consecutive positions (the last one shorter) of a scan over ``n`` rows: the
    rows ``0 .. n-1`` in place, or the rows ``order[0 .. n-1]`` (int64 indices)."""
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        yield RowBlock(start, stop, None if order is None else order[start:stop])


class ScoredScan(NamedTuple):
    """A blocked scan over the rows of ``[N, ...]`` tensors that reads the scored ones (:func:`scored_scan`):
    ``positions`` scanned (the scored rows on the CPU, every row on a GPU or traced), the row at each in ``order``
    (None: position = row), the ``compaction`` whose device count bounds the products (None: none), and
    ``zero_unscored``: whether unscored rows are scanned in place among the others, so that a gradient product must
    see their inputs zeroed (:func:`kept_rows`: 0 * NaN is not 0)."""

    positions: int
    order: Optional[Tensor]
    compaction: Optional[Compaction]
    zero_unscored: bool

    def blocks(self, rows: int) -> Iterator[tuple[RowBlock, Optional[Tensor]]]:
        """The blocks of ``rows`` positions, each with its count of scored rows on the device (None: no count)."""
        for block in row_blocks(self.positions, rows, self.order):
            yield block, None if self.compaction is None else self.compaction.live_in(block.start, block.stop)


def scored_scan(mask: Optional[Tensor], n: int) -> ScoredScan:
    """The scan of the rows of ``mask [n] != 0`` (None: every one of the ``n`` rows, in place): on the CPU the
    scored rows, on a GPU every row with the scored ones first and counted on the device, traced every row in
    place (:func:`~fastalign.ops.device_compaction.scored_order`)."""
    if mask is None:
        return ScoredScan(n, None, None, False)
    order, cmp = scored_order(mask)
    return ScoredScan(n if order is None else order.numel(), order, cmp, order is None and cmp is None)


def block_logprobs(h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *, rows: int, scale: float,
                   softcap: float, inv_t: float, ignore_index: int, backend: str) -> Tensor:
    """fp32 log-probs of the rows of ``h [n, H]``, ``rows`` at a time (no gradient): one
    matrix product and one statistics pass per block."""
    n = h.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    buf = block_buffer(min(rows, max(n, 1)), weight.shape[0], h)
    for block in row_blocks(n, rows):
        lp = block_forward(buf, block.take(h), weight, bias, block.take(labels), scale=scale, softcap=softcap,
                           inv_t=inv_t, ignore_index=ignore_index, backend=backend)[2]
        block.put(out, lp)
    return out
