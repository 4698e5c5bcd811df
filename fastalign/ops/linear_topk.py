"""The head's log-probs over a support of ``K`` ids per row: the top ``K`` of its own logits, or ids given.

Per block of rows (docs/math.md#top-k-support), the block's logits in fp32:

    z   = softcap(scale * (h @ W.T + b)) / T - max_j z_j         (one product; shifted, so that a log-prob's error
    lse = logsumexp_j z_j                                           is its own rounding whatever the offset)
    ids = topk(z, K) or the ids given,   lp = z[ids] - lse

and in backward, the block's logits recomputed, with ``g = d loss / d lp``:

    dz  = scatter(ids, g) - (sum_j g_j) softmax(z)              (d lp_j / d z_i = [i = ids_j] - p_i)
    dh  = dz' @ W,   dW += dz'.T @ h,   db += sum_rows dz'        (dz' = dz through the pipeline)

The selection is a constant of the backward, as ``torch.topk``'s. Only the rows asked for go through the
vocabulary and no block's logits outlive it (``FASTALIGN_BLOCK_MIB`` over the block's ``[rows, V]`` tiles: the
fp32 logits, the softcap derivative, a half-precision copy of d(logits) on a GPU). The products run in the
inputs' dtype on a GPU (fp32 accumulation, fp32 logits) and through fp32 copies on the CPU, as the two passes of
``linear_logprobs`` do; the top-k and the log-sum-exp are ``torch.topk`` and ``torch.logsumexp`` on the block.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign.ops._launch import refuse_second_derivative
from fastalign.ops.linear_block import row_blocks
from fastalign.ops.linear_cpu import chunk_grad_to_inputs, chunk_logits, softcap_derivative
from fastalign.ops.single_pass import block_budget_rows


def _block_rows(weight: Tensor, softcap: float) -> int:
    """Rows per block: the block budget over the fp32 ``[rows, V]`` tiles a block holds (the logits; the softcap
    derivative; on a GPU, d(logits) in a half-precision head's dtype for the products)."""
    tiles = 1 + (softcap > 0) + (0.5 if weight.is_cuda and weight.dtype != torch.float32 else 0)
    return block_budget_rows(weight.shape[0], weight.new_empty(0, dtype=torch.float32), tiles=tiles)


def _operand(t: Optional[Tensor]) -> Optional[Tensor]:
    """A product's operand: as it is on a GPU (fp32 output from its dtype), an fp32 copy on the CPU."""
    return t if t is None or t.is_cuda else t.float()


def _in_vocab(ids: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """(ids clamped into the vocabulary, where they were outside it)."""
    outside = (ids < 0) | (ids >= vocab)
    return ids.clamp(0, max(vocab - 1, 0)), outside


class TopKLogprobs(torch.autograd.Function):
    """``(lp [N, K] fp32, ids [N, K] int64)`` of the rows ``rows`` of ``hidden [N, H]`` (all rows when None; the
    others get 0 and id 0). ``ids``: the support, or None for the top ``k``. An id outside the vocabulary gives
    a NaN log-prob and no gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Optional[Tensor], k: int,
                rows: Optional[Tensor], scale: float, softcap: float, inv_t: float):
        N, V = hidden.shape[0], weight.shape[0]
        K = k if ids is None else ids.shape[1]
        lp = torch.zeros(N, K, dtype=torch.float32, device=hidden.device)
        support = torch.zeros(N, K, dtype=torch.int64, device=hidden.device) if ids is None else ids
        shift = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        n = N if rows is None else rows.numel()
        per_block = _block_rows(weight, softcap)
        buf = torch.empty(min(per_block, max(n, 1)) * V, dtype=torch.float32, device=hidden.device)
        w, b = _operand(weight), _operand(bias)
        for block in row_blocks(n, per_block, rows):
            z = chunk_logits(buf, _operand(block.take(hidden)), w, b, scale, softcap)
            if inv_t != 1.0:
                z.mul_(inv_t)
            top = z.amax(1)
            lse_c = torch.logsumexp(z.sub_(top[:, None]), 1)
            if ids is None:
                values, ids_c = z.topk(K, dim=1)
                block.put(support, ids_c)
            else:
                ids_c, outside = _in_vocab(block.take(ids), V)
                values = z.gather(1, ids_c).masked_fill_(outside, float("nan"))
            block.put(lp, values - lse_c[:, None])
            block.put(shift, top)
            block.put(lse, lse_c)
        ctx.save_for_backward(hidden, weight, bias, support, shift, lse, rows)
        ctx.options = (scale, softcap, inv_t)
        ctx.mark_non_differentiable(support)
        return lp, support

    @staticmethod
    def backward(ctx, g_lp: Tensor, _g_ids):
        refuse_second_derivative("top-k log-probs")
        hidden, weight, bias, support, shift, lse, rows = ctx.saved_tensors
        scale, softcap, inv_t = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = hidden.shape[0], weight.shape[0]
        n = N if rows is None else rows.numel()
        f32 = dict(dtype=torch.float32, device=hidden.device)
        dh = torch.zeros(hidden.shape, **f32) if need_h else None
        dw = torch.zeros(weight.shape, **f32) if need_w else None
        db = torch.zeros(V, **f32) if need_b and bias is not None else None
        per_block = _block_rows(weight, softcap)
        buf = torch.empty(min(per_block, max(n, 1)) * V, **f32)
        w, b = _operand(weight), _operand(bias)
        g_lp = g_lp.float()
        for block in row_blocks(n, per_block, rows):
            h_c = _operand(block.take(hidden))
            z = chunk_logits(buf, h_c, w, b, scale, softcap)
            deriv = softcap_derivative(z, softcap, scale) if softcap else None
            ids_c, outside = _in_vocab(block.take(support), V)
            g = block.take(g_lp).masked_fill(outside, 0.0)
            # dz = scatter(ids, g) - (sum_j g_j) p, then through 1 / T, the softcap and the scale
            p = z.mul_(inv_t).sub_(block.take(shift)[:, None]).sub_(block.take(lse)[:, None]).exp_()
            dz = p.mul_(-g.sum(1, keepdim=True))
            dz.scatter_add_(1, ids_c, g)
            dz.mul_(inv_t * (1.0 if softcap else scale))
            if softcap:
                dz.mul_(deriv)
            dz = dz.to(h_c.dtype)
            dh_c = torch.empty(h_c.shape, dtype=torch.float32, device=h_c.device) if need_h else None
            chunk_grad_to_inputs(dz, None, 1.0, 0.0, h_c, w, dh_c, dw, db, accumulate=False)
            if need_h:
                block.put(dh, dh_c)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None, None)
