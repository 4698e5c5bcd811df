"""Single pass of a pair loss through the LM head, a block of whole pairs at a time.

For a loss that is a sum of per-pair terms, the gradient of each token log-prob is known as
soon as the log-probs of its pair are. So each block of pairs goes through the head once
(:mod:`fastalign.ops.linear_block`): logits kept, statistics, the block's share of the loss
and its d/d(lp) from the caller's callback, then d(logits) in place and the gradients of
hidden, weight and bias, before the next block. With ``s_k`` the share of block ``k``
(``Σ_k s_k = loss``) and ``z`` its kept logits:

    lp, sum p^2        = stats(z)
    g                  = d s_k / d lp            (autograd through the callback, [b, T] grids)
    dh, dW, db        += d(lp)/d(h, W, b) · g    (block_backward: three matrix products per block)

The loss value (and its metrics) comes from the whole batch's log-probs; the backward only
scales the accumulated gradients by the incoming gradient. The callbacks are the caller's:
this layer knows pairs, rows and the logit pipeline, not the loss.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fastalign.ops.linear_block import block_backward, block_buffer, block_forward, block_logprobs, block_rows

#: Memory for the kept logits of one block, in MiB (``FASTALIGN_PAIR_BLOCK_MIB`` overrides).
DEFAULT_PAIR_BLOCK_MIB = 1024.0


def block_budget_rows(vocab: int, like: Tensor) -> int:
    """Rows of kept logits per block: the ``FASTALIGN_PAIR_BLOCK_MIB`` budget (1024 MiB by default) over
    one row of ``vocab`` logits in the block buffer's dtype (at least one row)."""
    mib = float(os.environ.get("FASTALIGN_PAIR_BLOCK_MIB", DEFAULT_PAIR_BLOCK_MIB))
    return block_rows(vocab, like, mib * (1 << 20))


class LogitPipeline(NamedTuple):
    """The logit pipeline and the kernel family of the blocks (docs/math.md#token-statistics)."""

    scale: float
    softcap: float  # 0: off
    inv_t: float
    ignore_index: int
    backend: str


#: share(lp_c [b, Tc], lp_r [b, Tr], sum_p2_c, sum_p2_r, pairs) -> the pairs' 0-dim share of the loss
BlockShare = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Tensor], slice], Tensor]
#: total(lp_c [B, Tc], lp_r [B, Tr], sum_p2_c, sum_p2_r) -> (loss, metrics) of the whole batch
BatchLoss = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Tensor]], Tuple[Tensor, dict]]


def pair_logprobs(h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, pipe: LogitPipeline) -> Tensor:
    """fp32 log-probs of the rows ``h [n, H]`` (no gradient), a budget of rows at a time."""
    return block_logprobs(h, weight, bias, labels.to(torch.int64).contiguous(),
                          rows=block_budget_rows(weight.shape[0], h), **pipe._asdict())


def single_pass_loss(hc: Tensor, hr: Tensor, weight: Tensor, bias: Optional[Tensor], yc: Tensor, yr: Tensor,
                     rows_c: Optional[Tensor], rows_r: Optional[Tensor], share: BlockShare, total: BatchLoss, *,
                     pipe: LogitPipeline, sum_p2: bool) -> Tuple[Tensor, dict]:
    """``(loss, metrics)`` of pairs ``(hc [B, Tc, H], hr [B, Tr, H])`` with labels ``yc, yr``; the gradients
    of ``hc``, ``hr``, ``weight`` and ``bias`` are computed here, block by block.

    ``rows_c`` / ``rows_r``: sorted flat indices of the labelled positions of each side (only those go
    through the head), or None for every position."""
    out: dict = {}
    loss = _SinglePass.apply(hc, hr, weight, bias, (yc, yr, rows_c, rows_r, share, total, pipe, sum_p2, out))
    return loss, out["metrics"]


def _side_rows(labels: Tensor, rows: Optional[Tensor], p0: int, p1: int) -> Tensor:
    """Flat row indices (into ``hidden.reshape(-1, H)``) of pairs ``p0..p1-1`` on one side."""
    T = labels.shape[1]
    if rows is None:
        return torch.arange(p0 * T, p1 * T, device=labels.device)
    lo, hi = torch.searchsorted(rows, torch.tensor([p0 * T, p1 * T], device=rows.device)).tolist()
    return rows[lo:hi]


class _SinglePass(torch.autograd.Function):
    """Loss value from the whole batch; d(hidden), d(weight), d(bias) summed block by block in
    the forward and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, hc, hr, weight, bias, state):
        yc, yr, rows_c, rows_r, share, total, pipe, sum_p2, out = state
        kw = pipe._asdict()
        B, H, V = hc.shape[0], hc.shape[-1], weight.shape[0]
        need_w, need_b = ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3]
        dtype_w = weight.dtype if weight.is_cuda else torch.float32
        dw = torch.zeros(weight.shape, dtype=dtype_w, device=weight.device) if need_w else None
        db = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
        dh = [torch.zeros(h.shape, dtype=h.dtype, device=h.device) if ctx.needs_input_grad[i] else None
              for i, h in enumerate((hc, hr))]
        flat = [h.reshape(-1, H) for h in (hc, hr)]
        y_flat = [y.reshape(-1).to(torch.int64) for y in (yc, yr)]
        lp_all = [torch.zeros(y.shape, dtype=torch.float32, device=y.device) for y in (yc, yr)]
        sp_all = [torch.ones(y.shape, dtype=torch.float32, device=y.device) for y in (yc, yr)] \
            if sum_p2 else [None, None]

        # pairs per block: their rows' logits within the budget (at least one pair)
        per_pair = (yc[0].numel() + yr[0].numel()) if rows_c is None else \
            -(-(rows_c.numel() + rows_r.numel()) // max(B, 1))
        k = max(1, min(B, block_budget_rows(V, hc) // max(per_pair, 1)))
        buf = None
        for p0 in range(0, B, k):
            p1 = min(B, p0 + k)
            idx = [_side_rows(y, r, p0, p1) for y, r in ((yc, rows_c), (yr, rows_r))]
            n_c = idx[0].numel()
            h_blk = torch.cat([flat[0].index_select(0, idx[0]), flat[1].index_select(0, idx[1])])
            y_blk = torch.cat([y_flat[0].index_select(0, idx[0]), y_flat[1].index_select(0, idx[1])])
            if buf is None or buf.numel() < h_blk.shape[0] * V:
                buf = None  # free the smaller buffer before the larger one is allocated
                buf = block_buffer(max(h_blk.shape[0], k * per_pair), V, hc)
            with torch.no_grad():
                z, deriv, lp, sp2, lse = block_forward(buf, h_blk, weight, bias, y_blk, sum_p2=sum_p2, **kw)
            # d (block's share of the loss) / d lp, on [b, T] grids of these pairs
            with torch.enable_grad():
                grids = []
                for side, (ids, part) in enumerate(((idx[0], lp[:n_c]), (idx[1], lp[n_c:]))):
                    lp_all[side].view(-1).index_copy_(0, ids, part)
                    grids.append(lp_all[side][p0:p1].detach().requires_grad_())
                sps = [None, None]
                if sum_p2:
                    for side, (ids, part) in enumerate(((idx[0], sp2[:n_c]), (idx[1], sp2[n_c:]))):
                        sp_all[side].view(-1).index_copy_(0, ids, part)
                    sps = [sp_all[0][p0:p1], sp_all[1][p0:p1]]
                s = share(grids[0], grids[1], sps[0], sps[1], slice(p0, p1))
                g = torch.autograd.grad(s, grids, allow_unused=True, materialize_grads=True)
            g_rows = torch.cat([g[side].reshape(-1).index_select(0, idx[side] - p0 * y.shape[1])
                                for side, y in enumerate((yc, yr))])
            dh_blk = block_backward(z, deriv, g_rows.float().contiguous(), h_blk, weight, y_blk, lse, dw=dw, db=db,
                                    **kw)
            for side, (ids, part) in enumerate(((idx[0], dh_blk[:n_c]), (idx[1], dh_blk[n_c:]))):
                if dh[side] is not None:
                    dh[side].view(-1, H).index_copy_(0, ids, part.to(dh[side].dtype))
        del buf
        with torch.no_grad():
            loss, metrics = total(lp_all[0], lp_all[1], sp_all[0], sp_all[1])
        # kept as attributes, not saved tensors: backward scales them in place (no second [V, H])
        ctx.grads = (dh[0], dh[1], dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        out["metrics"] = metrics
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("the single pass of a pair loss can be differentiated once per forward "
                               "(its gradients are computed in the forward); run the forward again")
        grads, ctx.grads = ctx.grads, None
        dtypes = (None, None, *ctx.dtypes)
        out = []
        for i, t in enumerate(grads):
            if t is None or not ctx.needs_input_grad[i]:
                out.append(None)
                continue
            t = t.mul_(g.to(t.dtype))
            out.append(t if dtypes[i] is None else t.to(dtypes[i]))
        return (*out, None)
