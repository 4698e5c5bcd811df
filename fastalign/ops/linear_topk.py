"""The head's log-probs over a support of ``K`` ids per row: the top ``K`` of its own logits, or ids given.

Per block of rows (docs/math.md#top-k-support), the block's logits in fp32:

    z   = softcap(scale * (h @ W.T + b)) / T - max_j z_j         (one product; shifted, so that a log-prob's error
    lse = logsumexp_j z_j                                           is its own rounding whatever the offset)
    ids = topk(z, K) or the ids given,   lp = z[ids] - lse

and in backward, the block's logits recomputed, with ``g = d loss / d lp``:

    dz  = scatter(ids, g) - (sum_j g_j) softmax(z)              (d lp_j / d z_i = [i = ids_j] - p_i)
    dh  = dz' @ W,   dW += dz'.T @ h,   db += sum_rows dz'        (dz' = dz through the pipeline)

Renormalised over the support (``renormalize``), only the support's logits count:

    lp  = z[ids] - logsumexp_k z[ids_k]       z[ids] = softcap(scale * (h . W[ids] + b[ids])) / T: K dot products
    dz  = g - (sum_k g_k) exp(lp)             at the support only   (d lp_j / d z[ids_i] = [i = j] - e^lp_i)
    dh  = dz' . W[ids],   dW[ids] += dz' h,   db[ids] += dz'          (K rows of the head per row)

so a support given costs K dot products per row instead of a pass over the vocabulary, and the backward never
builds a row's logits (the top-k forward still does, to find the ids). ``dW[ids] += ...`` is torch's embedding
backward (ids sorted: deterministic), a slice of the hidden columns at a time.

The selection is a constant of the backward, as ``torch.topk``'s. Only the rows asked for go through the
vocabulary and no block's logits outlive it (``FASTALIGN_BLOCK_MIB`` over the block's ``[rows, V]`` tiles: the
fp32 logits, the softcap derivative, a half-precision copy of d(logits) on a GPU; or over its ``[rows, K, H]``
fp32 rows of the head). The products run in the inputs' dtype on a GPU (fp32 accumulation, fp32 logits) and
through fp32 copies on the CPU, as the two passes of ``linear_logprobs`` do; the top-k and the log-sum-exp are
``torch.topk`` and ``torch.logsumexp`` on the block.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign.ops import support_products
from fastalign.ops._launch import refuse_second_derivative, save_for_backward
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


def _support_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, scale: float, softcap: float,
                    inv_t: float) -> Tensor:
    """``softcap(scale * (h . W[ids] + b[ids])) / T`` ``[n, K]`` fp32 at ``ids`` (in range): ``K`` dot products per
    row of ``h [n, H]`` (:func:`fastalign.ops.support_products.dots`)."""
    z = support_products.dots(h, weight, ids)
    if bias is not None:
        z += bias[ids].float()
    if scale != 1.0:
        z.mul_(scale)
    if softcap > 0:
        z.div_(softcap).tanh_().mul_(softcap)
    return z.mul_(inv_t)


def _renormalised(z: Tensor, outside: Optional[Tensor] = None) -> Tensor:
    """``log_softmax`` of the support's logits ``z [n, K]`` (after the temperature); a row with an id outside
    the vocabulary (``outside``) is NaN throughout (its support's distribution is undefined)."""
    if outside is not None:
        z = z.masked_fill(outside.any(1, keepdim=True), float("nan"))
    return z.log_softmax(1)


def _picker(rows: Optional[Tensor]):
    """The rows ``rows`` of a tensor (all of it for None)."""
    return (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))


def _in_place(part: Tensor, rows: Optional[Tensor], n: int) -> Tensor:
    """``part`` (the rows ``rows``) at its places in ``n`` rows, 0 at the others."""
    if rows is None:
        return part
    return part.new_zeros((n, *part.shape[1:])).index_copy_(0, rows, part)


def _support_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, rows: Optional[Tensor],
                     scale: float, softcap: float, inv_t: float) -> tuple[Tensor, Tensor]:
    """``(lp, z)`` ``[N, K]``: the log-probs renormalised over the ``ids`` given, and the support's logits (after
    the temperature), from ``K`` dot products per row: no logits over the vocabulary."""
    pick = _picker(rows)
    ids_c, outside = _in_vocab(pick(ids), weight.shape[0])
    z = _support_logits(pick(hidden), weight, bias, ids_c, scale, softcap, inv_t)
    return _in_place(_renormalised(z, outside), rows, ids.shape[0]), _in_place(z, rows, ids.shape[0])


def _vocabulary_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Optional[Tensor], K: int,
                        rows: Optional[Tensor], scale: float, softcap: float, inv_t: float, renormalize: bool):
    """``(lp, support, shift, lse, z)`` from the logits, a block of rows at a time: the top ``K`` ids (or the ids
    given) and their log-probs over the vocabulary (each row's max ``shift`` and ``lse``, for the backward; ``z``
    None), or the top ``K`` renormalised over the support (``z`` the support's logits after the temperature;
    ``shift``, ``lse`` None)."""
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lp = torch.zeros(N, K, **f32)
    support = torch.zeros(N, K, dtype=torch.int64, device=hidden.device) if ids is None else ids
    shift, lse = (None, None) if renormalize else (torch.zeros(N, **f32), torch.zeros(N, **f32))
    kept = torch.zeros(N, K, **f32) if renormalize else None
    n = N if rows is None else rows.numel()
    per_block = _block_rows(weight, softcap)
    buf = torch.empty(min(per_block, max(n, 1)) * V, **f32)
    w, b = _operand(weight), _operand(bias)
    for block in row_blocks(n, per_block, rows):
        z = chunk_logits(buf, _operand(block.take(hidden)), w, b, scale, softcap)
        if inv_t != 1.0:
            z.mul_(inv_t)
        if renormalize:  # the top-k only (a support given takes _support_forward)
            values, ids_c = z.topk(K, dim=1)
            block.put(support, ids_c)
            block.put(lp, _renormalised(values))
            block.put(kept, values)
            continue
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
    return lp, support, shift, lse, kept


def _vocabulary_backward(g_lp: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], support: Tensor,
                         shift: Tensor, lse: Tensor, rows: Optional[Tensor], scale: float, softcap: float,
                         inv_t: float, needs: tuple) -> tuple:
    """``(dh, dW, db)`` in fp32 of the log-probs over the vocabulary: each block's logits recomputed."""
    need_h, need_w, need_b = needs
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
        dh_c = torch.empty(h_c.shape, **f32) if need_h else None
        chunk_grad_to_inputs(dz, None, 1.0, 0.0, h_c, w, dh_c, dw, db, accumulate=False)
        if need_h:
            block.put(dh, dh_c)
    return dh, dw, db


def _support_backward(g_lp: Tensor, lp: Tensor, z: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                      support: Tensor, rows: Optional[Tensor], scale: float, softcap: float, inv_t: float,
                      needs: tuple) -> tuple:
    """``(dh, dW, db)`` in fp32 of the log-probs renormalised over the support (``z``: its logits after the
    temperature): products over the support's ``K`` rows of the head, no logits (a row with an id outside the
    vocabulary gets no gradient)."""
    need_h, need_w, need_b = needs
    V = weight.shape[0]
    pick = _picker(rows)
    ids, outside = _in_vocab(pick(support), V)
    g = pick(g_lp).float()
    # dz = g - (sum_k g_k) exp(lp) over the support, then through 1 / T, the softcap and the scale
    dz = (g - pick(lp).exp() * g.sum(1, keepdim=True)).mul_(inv_t)
    dz.mul_(softcap_derivative(pick(z) / inv_t, softcap, scale) if softcap else scale)
    dz.masked_fill_(outside.any(1, keepdim=True), 0.0)
    dh = _in_place(support_products.combine(dz, weight, ids), rows, hidden.shape[0]) if need_h else None
    dw = support_products.scatter(dz, ids, pick(hidden), V) if need_w else None
    db = support_products.scatter(dz, ids, None, V) if need_b and bias is not None else None
    return dh, dw, db


class TopKLogprobs(torch.autograd.Function):
    """``(lp [N, K] fp32, ids [N, K] int64)`` of the rows ``rows`` of ``hidden [N, H]`` (all rows when None; the
    others get 0 and id 0). ``ids``: the support, or None for the top ``k``; ``renormalize``: the log-probs
    renormalised over the support (module doc). An id outside the vocabulary gives a NaN log-prob (its whole row
    with ``renormalize``) and no gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Optional[Tensor], k: int,
                rows: Optional[Tensor], scale: float, softcap: float, inv_t: float, renormalize: bool = False):
        if renormalize and ids is not None:
            support, shift, lse = ids, None, None
            lp, z = _support_forward(hidden, weight, bias, ids, rows, scale, softcap, inv_t)
        else:
            lp, support, shift, lse, z = _vocabulary_forward(hidden, weight, bias, ids, k if ids is None else
                                                             ids.shape[1], rows, scale, softcap, inv_t, renormalize)
        save_for_backward(ctx, hidden, weight, bias, support, shift, lse, rows, *((lp, z) if renormalize else ()))
        ctx.options = (scale, softcap, inv_t, renormalize)
        ctx.mark_non_differentiable(support)
        return lp, support

    @staticmethod
    def backward(ctx, g_lp: Tensor, _g_ids):
        refuse_second_derivative("top-k log-probs")
        hidden, weight, bias, support, shift, lse, rows, *kept = ctx.saved_tensors
        scale, softcap, inv_t, renormalize = ctx.options
        needs = tuple(ctx.needs_input_grad[:3])
        if renormalize:
            dh, dw, db = _support_backward(g_lp, *kept, hidden, weight, bias, support, rows, scale, softcap, inv_t,
                                           needs)
        else:
            dh, dw, db = _vocabulary_backward(g_lp, hidden, weight, bias, support, shift, lse, rows, scale, softcap,
                                              inv_t, needs)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None, None, None)
