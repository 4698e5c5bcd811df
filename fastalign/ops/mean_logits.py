"""The mean logit of a softcapped head over the rows asked for, a block of rows at a time, and its gradient.

    u_j = h . W_j + a . L_j + b_j,   z_j = c tanh(s u_j / c),   mean = (1/V) sum_j w_j z_j
    d mean / d u_j = (s w_j / V) (1 - (z_j / c)^2)               (the backward recomputes z, block by block)

(``w``: the class weights, 1 without.)

The logits are the single pass's (:func:`fastalign.ops.linear_block.block_logits`, in the block buffer's dtype),
so this mean equals the one a loss's pass keeps. Only the rows asked for are multiplied: picked on the host by the
C++ backend (a CPU tensor's count is free), put first and counted on the device by the others
(:mod:`fastalign.ops.device_compaction`: the product kernel reads the count, no host sync).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign.ops._launch import eager, refuse_second_derivative, save_for_backward
from fastalign.ops.device_compaction import compact
from fastalign.ops.linear_block import _operands, block_buffer, block_logits, kept_rows, row_blocks
from fastalign.ops.linear_cpu import chunk_grad_to_inputs, labelled_rows, softcap_derivative
from fastalign.ops.single_pass import block_budget_rows


def _kept_rows(keep: Optional[Tensor], h: Tensor, backend: str):
    """``(picked, cmp)``: the rows ``keep`` asks for, as host indices (the C++ backend, eager CPU tensors; None when
    every row is kept) or as a device :class:`~fastalign.ops.device_compaction.Compaction` (the others, eagerly;
    traced, every row, the others zeroed after: the compaction's launch does not trace)."""
    if keep is None:
        return None, None
    if not eager(h, keep):
        return None, None
    if backend == "cpp":
        return labelled_rows(keep, False), None
    return None, compact(torch.where(keep, 0, -1), -1)  # None with FASTALIGN_DEVICE_COMPACTION=0: every row


def _rows(t: Optional[Tensor], picked, cmp) -> Optional[Tensor]:
    """The kept rows of ``t``, in the order the blocks take them."""
    if t is None or (picked is None and cmp is None):
        return t
    return t.index_select(0, picked) if picked is not None else cmp.gather(t)


def _in_place(rows: Tensor, picked, cmp, keep: Optional[Tensor]) -> Tensor:
    """Per-row results of the kept rows put back at their places, 0 at the others."""
    if picked is not None:
        into = torch.zeros((keep.numel(), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        return into.index_copy_(0, picked, rows)
    if cmp is not None:
        rows = cmp.scatter(rows)
    if keep is None:
        return rows
    return torch.where(keep.reshape(-1, *[1] * (rows.dim() - 1)), rows, torch.zeros((), dtype=rows.dtype,
                                                                                      device=rows.device))


@torch.no_grad()
def softcapped_mean_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], a: Optional[Tensor],
                           lora: Optional[Tensor], scale: float, softcap: float, keep: Optional[Tensor],
                           backend: str, classes: Optional[Tensor] = None) -> Tensor:
    """``(1/V) sum_j w_j z_j`` (fp32; ``w = classes [V]`` fp32, 1 when None) of each row of ``h [n, H]`` (``a [n, r]``
    its low-rank rows, ``lora [V, r]``) kept by ``keep [n]`` (bool; None: every row), 0 for the others."""
    picked, cmp = _kept_rows(keep, h, backend)
    h, a = _rows(h, picked, cmp), _rows(a, picked, cmp)
    rows = block_budget_rows(weight.shape[0], h)
    buf = block_buffer(min(rows, max(h.shape[0], 1)), weight.shape[0], h)
    means = []
    for block in row_blocks(h.shape[0], rows):  # blocks fixed by the shapes
        z = block_logits(buf, block.take(h), weight, bias, scale=scale, softcap=softcap,
                         low_rank=None if a is None else (block.take(a), lora),
                         live=None if cmp is None else cmp.live_in(block.start, block.stop))
        means.append(z.mean(-1, dtype=torch.float32) if classes is None else z.float() @ classes / z.shape[-1])
    mean = torch.cat(means) if means else h.new_zeros(0, dtype=torch.float32)
    return _in_place(mean, picked, cmp, keep)


@torch.no_grad()
def softcapped_mean_logits_backward(grad: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    a: Optional[Tensor], lora: Optional[Tensor], scale: float, softcap: float,
                                    keep: Optional[Tensor], backend: str, needs: tuple,
                                    classes: Optional[Tensor] = None) -> tuple:
    """``(dh, dW, db, da, dL)`` of ``sum_r grad_r mean_r`` (:func:`softcapped_mean_logits`' arguments; ``needs``:
    which of the five to form, None for the others): ``dz_rj = grad_r w_j / V`` through the softcap, the logits of a
    block of the kept rows recomputed, then the head's products (dW, db, dL accumulated in fp32)."""
    need_h, need_w, need_b, need_a, need_l = needs
    V = weight.shape[0]
    g = grad.reshape(-1).float() / V
    if keep is not None:  # a row not asked for is 0 in the forward: no gradient, whatever its grad holds
        g = torch.where(keep, g, 0.0)
    picked, cmp = _kept_rows(keep, h, backend)
    if keep is not None and picked is None and cmp is None:  # every row multiplied: the others' inputs 0, so that
        h, a = kept_rows(h, keep), None if a is None else kept_rows(a, keep)  # a NaN there reaches no gradient
    h_k, a_k, g = _rows(h, picked, cmp), _rows(a, picked, cmp), _rows(g, picked, cmp)

    def zeros(t, wanted):
        return torch.zeros(t.shape, dtype=torch.float32, device=t.device) if wanted and t is not None else None

    dw, db, dl = zeros(weight, need_w), zeros(bias, need_b), zeros(lora, need_l)
    dh = zeros(h, need_h) if h_k.shape[0] == 0 else None  # no kept row: nothing to multiply
    da = zeros(a, need_a) if h_k.shape[0] == 0 else None
    rows = block_budget_rows(V, h_k)
    buf = block_buffer(min(rows, max(h_k.shape[0], 1)), V, h_k)
    dh_rows, da_rows = [], []
    for block in row_blocks(h_k.shape[0], rows):  # blocks fixed by the shapes
        h_b, a_b = block.take(h_k), block.take(a_k)
        low_rank = None if a is None else (a_b, lora)
        live = None if cmp is None else cmp.live_in(block.start, block.stop)
        z = block_logits(buf, h_b, weight, bias, scale=scale, softcap=softcap, low_rank=low_rank, live=live)
        # the gradient and the class weights multiply in fp32, unrounded (a bf16 / fp16 block on a GPU is rounded
        # after each product, never by a factor rounded first)
        dz = softcap_derivative(z, softcap, scale, out=z).mul_(block.take(g).float()[:, None])
        if classes is not None:
            dz.mul_(classes.float())
        h_b, w_b, low_rank = _operands(z, h_b, weight, low_rank)
        dh_b = torch.empty(h_b.shape, dtype=z.dtype, device=z.device) if need_h else None
        da_b = torch.empty(a_b.shape, dtype=z.dtype, device=z.device) if need_a and a is not None else None
        chunk_grad_to_inputs(dz, None, 1.0, 0.0, h_b, w_b, dh_b, dw, db, accumulate=False, low_rank=low_rank,
                             low_rank_grads=(da_b, dl), live=live)
        dh_rows.append(dh_b)
        da_rows.append(da_b)
    if dh_rows and need_h:
        dh = _in_place(torch.cat(dh_rows), picked, cmp, keep).to(h.dtype)
    if da_rows and need_a and a is not None:
        da = _in_place(torch.cat(da_rows), picked, cmp, keep).to(a.dtype)
    return dh, dw, db, da, dl


class SoftcappedMeanLogits(torch.autograd.Function):
    """:func:`softcapped_mean_logits`, differentiable in ``h``, ``weight``, ``bias``, ``a`` and ``lora``
    (:func:`softcapped_mean_logits_backward`: a second pass over the vocabulary, the logits recomputed)."""

    @staticmethod
    def forward(ctx, h, weight, bias, a, lora, scale: float, softcap: float, keep, backend: str, classes=None):
        save_for_backward(ctx, h, weight, bias, a, lora, keep, classes)
        ctx.options = (scale, softcap, backend)
        return softcapped_mean_logits(h, weight, bias, a, lora, scale, softcap, keep, backend, classes)

    @staticmethod
    def backward(ctx, grad):
        refuse_second_derivative("softcapped mean logits")
        h, weight, bias, a, lora, keep, classes = ctx.saved_tensors
        scale, softcap, backend = ctx.options
        dh, dw, db, da, dl = softcapped_mean_logits_backward(grad, h, weight, bias, a, lora, scale, softcap, keep,
                                                             backend, tuple(ctx.needs_input_grad[:5]), classes)

        def cast(d, like):
            return None if d is None else d.to(like.dtype)

        return cast(dh, h), cast(dw, weight), cast(db, bias), cast(da, a), cast(dl, lora), None, None, None, None, None
