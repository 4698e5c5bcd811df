"""Cross-entropy against soft targets from hidden states and a head, a block of rows at a time.

With ``z_r = h_r W^T + b``, targets ``q_r`` (any non-negative weights over the vocabulary, ``m_r = sum_j q_rj``)
and row weights ``c_r`` (docs/math.md#soft-targets):

    loss = sum_r c_r CE_r,    CE_r = sum_j q_rj (lse_r - z_rj / T),    lse_r = log sum_j exp(z_rj / T)
    d loss / d z_rj = c_r (m_r p_rj - q_rj) / T,                       p_r = softmax(z_r / T)

Per block: the logits (one product), then ``lse`` and ``CE`` in fp32 (each term of the sum is >= 0: no
cancellation), and where gradients are needed d(logits) formed in fp32 and rounded once into the block, then
``dh = dz W``, ``dW += dz^T h``, ``db += sum dz`` (two products). Eager calls do this in the forward (the single
pass: the backward scales the gradients by the incoming one); traced calls (torch.compile) run the forward's
blocks alone and again in the backward with ``c g``. A row of weight 0 is not read: its target and hidden
state may hold anything (NaN, inf) and it adds nothing; on the CPU only the other rows go through the head, on a GPU
they come first and are counted on the device (:mod:`~fastalign.ops.device_compaction`: no host sync).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign.ops._launch import refuse_second_derivative, save_for_backward
from fastalign.ops.linear_block import (_operands, block_buffer, block_dtype, forward_grads, kept_rows, scored_scan,
                                        zero_grads)
from fastalign.ops.linear_cpu import chunk_grad_to_inputs, chunk_logits
from fastalign.ops.single_pass import block_budget_rows

#: fp32 ``[rows, V]`` tiles a block holds at most: z / T (the logits themselves on the CPU), the targets, their
#: product with -log p, and on a GPU the logits (half a tile in bf16 / fp16)
_FP32_TILES = 4


def run_blocks(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, coef: Optional[Tensor],
               inv_t: float, grads=None, g: Optional[Tensor] = None) -> Tensor:
    """``CE_r`` (fp32 ``[N]``, 0 where the fp32 ``coef`` is 0; ``coef`` None: every row, of weight 1) of
    ``hidden [N, H]``, ``target [N, V]``; with ``grads = (dh, dw, db)`` also d(g sum_r coef_r CE_r) (``g``: the
    incoming gradient, None: 1) with respect to hidden (written, in dh's dtype), weight and bias (accumulated in
    fp32); None entries are skipped."""
    N, V = hidden.shape[0], weight.shape[0]
    ce = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    scan = scored_scan(coef, N)  # only the rows of weight != 0 multiplied (first, on a GPU)
    if scan.positions == 0:
        return ce
    f32 = hidden.new_empty(0, dtype=torch.float32)
    rows = min(block_budget_rows(V, f32, tiles=_FP32_TILES), scan.positions)
    buf = block_buffer(rows, V, hidden)
    dh, dw, db = (None, None, None) if grads is None else grads
    w, b = _operands(buf, weight, bias)  # converted once (to fp32 for a bf16 / fp16 head on the CPU)
    step = f32.new_full((1,), inv_t)  # d(logits) = c step (m p - q), step = g / T in fp32
    if g is not None:
        step = step * g.float().reshape(1)
    with torch.no_grad():
        for block, live in scan.blocks(rows):
            c = block.take(coef)
            h = block.take(hidden)
            if scan.zero_unscored:  # rows of weight 0 in the block: they add nothing, even if not finite
                h = kept_rows(h, c != 0)
            (h,) = _operands(buf, h)
            z = chunk_logits(buf, h, w, b, 1.0, 0.0, live=live)
            zt = z.float()  # z / T in fp32: in place on the CPU's fp32 block
            if inv_t != 1.0:
                zt.mul_(inv_t)
            lse = torch.logsumexp(zt, -1, keepdim=True)
            q = block.take(target).float()
            if c is not None:  # a row of weight 0 scanned (in place, or past the live count): its target not read
                q = torch.where(c[:, None] != 0, q, 0.0)
            nlp = zt.neg_().add_(lse)  # -log p = lse - z / T >= 0, in place
            block.put(ce, (q * nlp).sum(-1))
            if grads is None:
                continue
            # d(logits) = c (m p - q) g / T in fp32, in place, rounded once into the block's logits (on a GPU)
            dz = nlp.neg_().exp_().mul_(q.sum(-1, keepdim=True)).sub_(q).mul_(step if c is None else
                                                                             (c * step)[:, None])
            if dz is not z:
                z.copy_(dz)
            dh_b = None if dh is None else torch.empty(h.shape, dtype=z.dtype, device=z.device)
            chunk_grad_to_inputs(z, None, 1.0, 0.0, h, w, dh_b, dw, db, accumulate=False, live=live)
            if dh is not None:
                block.put(dh, dh_b.to(dh.dtype))
    return ce


class SoftCrossEntropy(torch.autograd.Function):
    """``sum_r coef_r CE_r`` (fp32, 0-dim; ``coef`` None: 1) with gradients to hidden, weight and bias (not to the
    targets or the row weights). ``single_pass``: the gradients in the forward, of the inputs in
    ``ctx.needs_input_grad``; the caller passes it only when autograd may ask for a gradient (otherwise a forward
    fills gradients nobody reads)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, coef, inv_t: float, single_pass: bool):
        need = ctx.needs_input_grad
        grads = None
        if single_pass and any(need[:3]):  # d(hidden) in the blocks' dtype (fp32 on the CPU): scaled in the backward
            grads = zero_grads(hidden, weight, bias, need, block_dtype(hidden))
        ce = run_blocks(hidden, weight, bias, target, coef, inv_t, grads)
        ctx.single_pass, ctx.grads, ctx.inv_t = single_pass, grads, inv_t
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if not single_pass:
            save_for_backward(ctx, hidden, weight, bias, target, coef)
        return ce.sum() if coef is None else (coef * ce).sum()

    @staticmethod
    def backward(ctx, g):
        refuse_second_derivative("soft-target cross-entropy")
        need = ctx.needs_input_grad
        if ctx.single_pass:  # multiplied in fp32 by the unrounded incoming gradient
            grads = forward_grads(ctx, g, "the soft-target cross-entropy")
        else:
            hidden, weight, bias, target, coef = ctx.saved_tensors
            grads = zero_grads(hidden, weight, bias, need, hidden.dtype)
            run_blocks(hidden, weight, bias, target, coef, ctx.inv_t, grads, g)
        dh, dw, db = (None if d is None or not n else d.to(dtype) for d, n, dtype in zip(grads, need, ctx.dtypes))
        return dh, dw, db, None, None, None, None
