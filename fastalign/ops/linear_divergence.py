"""The distillation divergence from both models' hidden states and heads, a block of tokens at a time.

Per block of scored rows (docs/math.md#distillation-divergence):

    z_s = softcap_s(scale_s * (h_s @ W_s.T + b_s)),  z_t = softcap_t(scale_t * (h_t @ W_t.T + b_t))   (2 products)
    D, H, NLL, and dz_s over z_s in place                                   (fastalign::divergence_rows)
    dh_s = dz @ W_s,   dW_s += dz.T @ h_s,   db_s += sum_rows dz             (2 products)

four matrix products per token when gradients are needed, two without. The loss is linear in the
per-row D and NLL with weights known before the pass (the mask over a normalizer), so the block's
gradient is final as soon as its rows are done: the backward only scales the gradients summed in the
forward by the incoming gradient (``single_pass``), or, without it, runs the blocks again with the
incoming gradient folded into the weights (two products more per token, nothing kept between).
Only scored rows go through the vocabulary: found on the host for CPU tensors, put first on the device
(:mod:`~fastalign.ops.device_compaction`) on a GPU. The blocks are sized by the single pass's budget
(``FASTALIGN_BLOCK_MIB``, :func:`~fastalign.ops.single_pass.block_budget_rows`; two logit tiles per block).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign.ops._launch import eager
from fastalign.ops.device_compaction import compact
from fastalign.ops.divergence import divergence_rows_call
from fastalign.ops.linear_block import _operands, block_buffer, kept_rows, row_blocks
from fastalign.ops.linear_cpu import chunk_grad_to_inputs, chunk_logits, softcap_derivative
from fastalign.ops.single_pass import block_budget_rows


class Head(NamedTuple):
    """One model's head: hidden states ``[N, H]``, weight ``[V, H]``, bias, and its logit pipeline."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    scale: float
    softcap: float  # 0: off


class DivergenceOptions(NamedTuple):
    inv_t: float
    beta: float
    ignore_index: int
    nll: bool  # the student NLL of the labels (the hard loss)
    backend: str


def _scored_order(mask: Tensor):
    """(row indices in block order or None for every row, live count per block helper or None).

    CPU: the scored rows, found on the host. GPU: every row, the scored ones first, and their count on
    the device (no host sync); None when device compaction is off. Traced (torch.compile, fake tensors):
    every row in place (the kernels give unscored rows 0), no value read."""
    if not eager(mask):
        return None, None
    if mask.device.type == "cpu":
        keep = mask != 0
        return (None if bool(keep.all()) else keep.nonzero().squeeze(1)), None
    cmp = compact(torch.where(mask != 0, 0, -1), -1)
    return (None, None) if cmp is None else (cmp.order, cmp)


def run_blocks(student: Head, teacher: Head, mask: Tensor, labels: Optional[Tensor], g_soft: Optional[Tensor],
               g_hard: Optional[Tensor], opts: DivergenceOptions, grads=None):
    """Per-row ``(divergence, entropy, nll)`` (fp32 ``[N]``, 0 on unscored rows; nll empty without
    ``opts.nll``). With ``g_soft`` (per-row weights of D, and ``g_hard`` of the NLL), ``grads = (dh, dw, db)``
    receive d(sum_r g_soft D_r + g_hard NLL_r) with respect to the student's hidden states (written), weight and
    bias (fp32, accumulated); None entries are skipped."""
    N, V = student.hidden.shape[0], student.weight.shape[0]
    dev = student.hidden.device
    div = torch.zeros(N, dtype=torch.float32, device=dev)
    ent = torch.zeros(N, dtype=torch.float32, device=dev)
    nll = torch.zeros(N if opts.nll else 0, dtype=torch.float32, device=dev)
    order, cmp = _scored_order(mask)
    n = N if order is None else order.numel()
    if n == 0:
        return div, ent, nll
    k = max(1, block_budget_rows(V, student.hidden) // 2)  # two logit tiles per block
    k = min(k, n)
    buf_s = block_buffer(k, V, student.hidden)
    buf_t = block_buffer(k, V, student.hidden)
    dh, dw, db = grads if grads is not None else (None, None, None)
    with torch.no_grad():
        for block in row_blocks(n, k, order):
            live = None if cmp is None else cmp.live_in(block.start, block.stop)
            hs, ws, bs = _operands(buf_s, block.take(student.hidden), student.weight, student.bias)
            ht, wt, bt = _operands(buf_t, block.take(teacher.hidden), teacher.weight, teacher.bias)
            zs = chunk_logits(buf_s, hs, ws, bs, student.scale, student.softcap, live=live)
            deriv = (softcap_derivative(zs, student.softcap, student.scale)
                     if g_soft is not None and student.softcap > 0 else None)
            zt = chunk_logits(buf_t, ht, wt, bt, teacher.scale, teacher.softcap, live=live)
            d_b, e_b, n_b = divergence_rows_call(
                zs, zt, block.take(mask).float().contiguous(),
                None if labels is None else block.take(labels).contiguous(),
                None if g_soft is None else block.take(g_soft).float().contiguous(),
                None if g_hard is None else block.take(g_hard).float().contiguous(),
                opts.inv_t, opts.beta, opts.ignore_index, opts.nll, opts.backend)
            for full, part in ((div, d_b), (ent, e_b), (nll, n_b)):
                if full.numel():
                    block.put(full, part)
            if g_soft is not None:
                if order is None and cmp is None:  # unscored rows in the block: they add nothing, even if not finite
                    hs = kept_rows(hs, block.take(mask) != 0)
                dh_b = None if dh is None else torch.empty(hs.shape, dtype=zs.dtype, device=dev)
                chunk_grad_to_inputs(zs, deriv, student.scale, student.softcap, hs, ws, dh_b, dw, db,
                                     accumulate=False, live=live)
                if dh is not None:
                    block.put(dh, dh_b.to(dh.dtype))
    return div, ent, nll


def _zero_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need) -> tuple:
    """``(dh, dw, db)`` for :func:`run_blocks` to fill: zeros for the inputs in ``need`` (``ctx.needs_input_grad``),
    d(hidden) in its dtype, d(weight) and d(bias) in fp32; None for the others."""
    return (torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need[0] else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None,
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if bias is not None and need[2] else None)


class DivergencePass(torch.autograd.Function):
    """``(loss, divergence, entropy, nll)``: ``loss = sum_r g_soft_r D_r + g_hard_r NLL_r`` with gradients to the
    student's hidden states, weight and bias, and the per-row ``D``, ``H`` and ``NLL`` of :func:`run_blocks`
    (not differentiable). ``state = (student scale, softcap, teacher Head, mask, labels, g_soft, g_hard, opts,
    single_pass)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, state):
        scale, cap, teacher, mask, labels, g_soft, g_hard, opts, single_pass = state
        student = Head(hidden, weight, bias, scale, cap)
        need = ctx.needs_input_grad
        grads = _zero_grads(hidden, weight, bias, need) if single_pass and any(need[:3]) else None
        div, ent, nll = run_blocks(student, teacher, mask, labels, g_soft if grads is not None else None,
                                   g_hard if grads is not None else None, opts, grads)
        loss = (g_soft * div).sum()
        if g_hard is not None and nll.numel():
            loss = loss + (g_hard * nll).sum()
        ctx.mark_non_differentiable(div, ent, nll)
        ctx.grads = grads
        ctx.single_pass = single_pass
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if not single_pass:
            ctx.state = (student, teacher, mask, labels, g_soft, g_hard, opts)
        return loss, div, ent, nll

    @staticmethod
    def backward(ctx, g, _g_div, _g_ent, _g_nll):
        need = ctx.needs_input_grad
        if ctx.single_pass:
            if ctx.grads is None:
                raise RuntimeError("the single pass of the divergence can be differentiated once per forward "
                                   "(its gradients are computed in the forward); run the forward again, or pass "
                                   "single_pass=False to differentiate a retained graph more than once")
            grads, ctx.grads = ctx.grads, None
        else:
            student, teacher, mask, labels, g_soft, g_hard, opts = ctx.state
            grads = _zero_grads(student.hidden, student.weight, student.bias, need)
            gf = g.float()
            run_blocks(student, teacher, mask, labels, g_soft * gf, None if g_hard is None else g_hard * gf, opts,
                       grads)
        dh, dw, db = grads
        if ctx.single_pass:
            dh = None if dh is None else dh.mul_(g.to(dh.dtype))
            dw = None if dw is None else dw.mul_(g.float())
            db = None if db is None else db.mul_(g.float())
        dw = None if dw is None or not need[1] else dw.to(ctx.dtypes[0])
        db = None if db is None or not need[2] else db.to(ctx.dtypes[1])
        return (dh if need[0] else None), dw, db, None
