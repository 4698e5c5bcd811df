"""The distillation divergence from both models' hidden states and heads, a block of tokens at a time.

Per block of scored rows (docs/math.md#distillation-divergence):

    z_s = softcap_s(scale_s * (h_s @ W_s.T + b_s)),  z_t = softcap_t(scale_t * (h_t @ W_t.T + b_t))   (2 products)
    D, H, NLL, and dz_s over z_s in place                                   (fastalign::divergence_rows)
    dh_s = dz @ W_s,   dW_s += dz.T @ h_s,   db_s += sum_rows dz             (2 products)

four matrix products per token when gradients are needed, two without. The loss is linear in the
per-row D and NLL with weights known before the pass (the mask over the token count), so the block's
gradient is final as soon as its rows are done: the backward only scales the gradients summed in the
forward by the incoming gradient (``single_pass``), or, without it, runs the blocks again with the
incoming gradient folded into the weights (two products more per token, nothing kept between).
Only scored rows go through the vocabulary: found on the host for CPU tensors, put first on the device
(:mod:`~fastalign.ops.device_compaction`) on a GPU. The blocks are sized by the single pass's budget
(``FASTALIGN_BLOCK_MIB``, :func:`~fastalign.ops.single_pass.block_budget_rows`; two logit tiles per block, three with the
student's softcap derivative).

Eager calls run :class:`DivergencePass`; traced ones (torch.compile, fake tensors) the custom ops
``fastalign::linear_divergence`` and ``fastalign::linear_divergence_backward`` (the two passes), whose fakes
declare the outputs only: the blocks loop over the tokens at run time, so a new token count needs no new graph.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign.ops._launch import check_rows, eager, kernel_op, refuse_second_derivative, save_for_backward
from fastalign.ops.divergence import divergence_rows_call
from fastalign.ops.linear_block import (_operands, block_buffer, block_dtype, forward_grads, kept_rows, scored_scan,
                                        zero_grads)
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
    divergence: str  # ops.divergence.DIVERGENCES
    beta: float
    ignore_index: int
    nll: bool  # the student NLL of the labels (the hard loss)
    backend: str


def _row_outputs(hidden: Tensor, nll: bool):
    """Per-row ``(divergence, entropy, nll)``: fp32 ``[N]`` (nll ``[0]`` unless asked)."""
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n if nll else 0, **f32)


def run_blocks(student: Head, teacher: Head, mask: Tensor, labels: Optional[Tensor], g_soft: Optional[Tensor],
               g_hard: Optional[Tensor], opts: DivergenceOptions, grads=None, out=None):
    """Per-row ``(divergence, entropy, nll)`` (fp32 ``[N]``, 0 on unscored rows; nll empty without
    ``opts.nll``), written into ``out`` when given. With ``g_soft`` (per-row weights of D, and ``g_hard`` of the
    NLL), ``grads = (dh, dw, db)`` receive d(sum_r g_soft D_r + g_hard NLL_r) with respect to the student's hidden
    states (written), weight and bias (fp32, accumulated); None entries are skipped."""
    N, V = student.hidden.shape[0], student.weight.shape[0]
    dev = student.hidden.device
    div, ent, nll = (t.zero_() for t in (out or _row_outputs(student.hidden, opts.nll)))
    scan = scored_scan(mask, N)
    if scan.positions == 0:
        return div, ent, nll
    with_deriv = g_soft is not None and student.softcap > 0  # the student's softcap derivative
    # One buffer dtype for both heads' logits (divergence_rows takes one), wide enough for either head's.
    like = student.hidden.new_empty(0, dtype=torch.promote_types(student.hidden.dtype, teacher.hidden.dtype))
    k = min(block_budget_rows(V, like, tiles=3 if with_deriv else 2), scan.positions)  # logit tiles per block
    buf_s = block_buffer(k, V, like)
    buf_t = block_buffer(k, V, like)
    buf_d = block_buffer(k, V, like) if with_deriv else None
    dh, dw, db = grads if grads is not None else (None, None, None)
    with torch.no_grad():
        for block, live in scan.blocks(k):
            hs, ws, bs = _operands(buf_s, block.take(student.hidden), student.weight, student.bias)
            ht, wt, bt = _operands(buf_t, block.take(teacher.hidden), teacher.weight, teacher.bias)
            zs = chunk_logits(buf_s, hs, ws, bs, student.scale, student.softcap, live=live)
            deriv = (softcap_derivative(zs, student.softcap, student.scale, out=buf_d[:zs.numel()].view(zs.shape))
                     if with_deriv else None)
            zt = chunk_logits(buf_t, ht, wt, bt, teacher.scale, teacher.softcap, live=live)
            d_b, e_b, n_b = divergence_rows_call(
                zs, zt, block.take(mask).float().contiguous(),
                None if labels is None else block.take(labels).contiguous(),
                None if g_soft is None else block.take(g_soft).float().contiguous(),
                None if g_hard is None else block.take(g_hard).float().contiguous(),
                opts.inv_t, opts.divergence, opts.beta, opts.ignore_index, opts.nll, opts.backend)
            for full, part in ((div, d_b), (ent, e_b), (nll, n_b)):
                if full.numel():
                    block.put(full, part)
            if g_soft is not None:
                if scan.zero_unscored:  # unscored rows in the block: they add nothing, even if not finite
                    hs = kept_rows(hs, block.take(mask) != 0)
                dh_b = None if dh is None else torch.empty(hs.shape, dtype=zs.dtype, device=dev)
                chunk_grad_to_inputs(zs, deriv, student.scale, student.softcap, hs, ws, dh_b, dw, db,
                                     accumulate=False, live=live)
                if dh is not None:
                    block.put(dh, dh_b.to(dh.dtype))
    return div, ent, nll


class DivergencePass(torch.autograd.Function):
    """``(loss, divergence, entropy, nll)``: ``loss = sum_r g_soft_r D_r + g_hard_r NLL_r`` with gradients to the
    student's hidden states, weight and bias, and the per-row ``D``, ``H`` and ``NLL`` of :func:`run_blocks`
    (not differentiable). ``state = (student scale, softcap, teacher Head, mask, labels, g_soft, g_hard, opts,
    single_pass)``; ``single_pass``: the gradients in the forward, of the inputs in ``ctx.needs_input_grad``. That
    flag is set from the inputs' ``requires_grad`` even under ``torch.no_grad()``, and the forward runs without
    grad mode, so the caller passes ``single_pass`` only when autograd may ask for a gradient
    (:func:`~fastalign.ops.single_pass.differentiated`): otherwise a forward would fill gradients nobody reads."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, state):
        scale, cap, teacher, mask, labels, g_soft, g_hard, opts, single_pass = state
        student = Head(hidden, weight, bias, scale, cap)
        need = ctx.needs_input_grad
        grads = None
        if single_pass and any(need[:3]):  # d(hidden) in the blocks' dtype (fp32 on the CPU): scaled in the backward
            grads = zero_grads(hidden, weight, bias, need, block_dtype(hidden))
        div, ent, nll = run_blocks(student, teacher, mask, labels, g_soft if grads is not None else None,
                                   g_hard if grads is not None else None, opts, grads)
        loss = (g_soft * div).sum()
        if g_hard is not None and nll.numel():
            loss = loss + (g_hard * nll).sum()
        ctx.mark_non_differentiable(div, ent, nll)
        ctx.grads = grads
        ctx.single_pass = single_pass
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if not single_pass:
            ctx.state = (student, teacher, mask, labels, g_soft, g_hard, opts)
        return loss, div, ent, nll

    @staticmethod
    def backward(ctx, g, _g_div, _g_ent, _g_nll):
        refuse_second_derivative("divergence loss")
        need = ctx.needs_input_grad
        if ctx.single_pass:  # multiplied in fp32 by the unrounded incoming gradient (a loss scale, 1 / steps)
            grads = forward_grads(ctx, g, "the divergence")
        else:
            student, teacher, mask, labels, g_soft, g_hard, opts = ctx.state
            grads = zero_grads(student.hidden, student.weight, student.bias, need, student.hidden.dtype)
            gf = g.float()
            run_blocks(student, teacher, mask, labels, g_soft * gf, None if g_hard is None else g_hard * gf, opts,
                       grads)
        dh, dw, db = (None if d is None or not n else d.to(dtype) for d, n, dtype in zip(grads, need, ctx.dtypes))
        return dh, dw, db, None


def divergence_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], state):
    """``(loss, divergence, entropy, nll)`` of :class:`DivergencePass` (same ``state``): that autograd function in
    an eager call (:func:`~fastalign.ops._launch.eager`), else the custom ops (the two passes; ``g_soft`` and
    ``g_hard`` are constants either way). The per-row outputs come back without gradient."""
    scale, cap, teacher, mask, labels, g_soft, g_hard, opts, _single_pass = state
    if eager(hidden, weight, bias, teacher.hidden, teacher.weight, teacher.bias, mask, labels, g_soft, g_hard):
        return DivergencePass.apply(hidden, weight, bias, state)
    div, ent, nll = linear_divergence(hidden, weight, bias, teacher.hidden, teacher.weight, teacher.bias, mask,
                                      labels, scale, cap, teacher.scale, teacher.softcap, opts.inv_t,
                                      opts.divergence, opts.beta, opts.ignore_index, opts.nll, opts.backend)
    loss = (g_soft.detach() * div).sum()
    if g_hard is not None:
        loss = loss + (g_hard.detach() * nll).sum()
    return loss, div.detach(), ent, nll.detach()


def _heads(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, scale, softcap, teacher_scale,
           teacher_softcap):
    return (Head(hidden, weight, bias, scale, softcap),
            Head(teacher_hidden, teacher_weight, teacher_bias, teacher_scale, teacher_softcap))


def _op_outputs(hidden: Tensor, mask: Tensor, labels: Optional[Tensor], nll: bool):
    """The per-row outputs; the per-row inputs checked first (the kernels read them by pointer)."""
    check_rows("mask", mask, hidden.shape[0], torch.float32)
    if labels is not None:
        check_rows("labels", labels, hidden.shape[0], torch.int64)
    if nll and labels is None:
        raise ValueError("nll needs labels")
    return _row_outputs(hidden, nll)


@kernel_op("linear_divergence", _op_outputs)
def linear_divergence(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor, teacher_weight: Tensor,
    teacher_bias: Optional[Tensor], mask: Tensor, labels: Optional[Tensor], scale: float, softcap: float,
    teacher_scale: float, teacher_softcap: float, inv_temperature: float, divergence: str, beta: float,
    ignore_index: int, nll: bool, backend: str, out: tuple[Tensor, Tensor, Tensor],
) -> None:
    """Per-row ``(divergence, entropy, nll)`` of the student's rows ``hidden [N, H]`` against the teacher's
    (:func:`run_blocks`; fp32 mask ``[N]``, 0 for an unscored row, int64 labels ``[N]``); nll empty unless asked.
    Differentiable in divergence and nll (:func:`linear_divergence_backward`) with respect to the student's
    ``hidden``, ``weight`` and ``bias``; the entropy and the teacher's inputs get no gradient."""
    student, teacher = _heads(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, scale, softcap,
                              teacher_scale, teacher_softcap)
    opts = DivergenceOptions(inv_temperature, divergence, beta, ignore_index, nll, backend)
    run_blocks(student, teacher, mask, labels, None, None, opts, out=out)


def _grad_outputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_hidden: bool, need_weight: bool,
                  need_bias: bool):
    """(d hidden, d weight, d bias) in the input dtypes; one not needed is empty."""
    def grad(t: Optional[Tensor], need: bool) -> Tensor:
        return t.new_empty(t.shape) if t is not None and need else weight.new_empty((0,))

    return grad(hidden, need_hidden), grad(weight, need_weight), grad(bias, need_bias)


@kernel_op("linear_divergence_backward", _grad_outputs)
def linear_divergence_backward(
    grad_divergence: Optional[Tensor], grad_nll: Optional[Tensor], hidden: Tensor, weight: Tensor,
    bias: Optional[Tensor], teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    mask: Tensor, labels: Optional[Tensor], scale: float, softcap: float, teacher_scale: float,
    teacher_softcap: float, inv_temperature: float, divergence: str, beta: float, ignore_index: int, backend: str,
    need_hidden: bool, need_weight: bool, need_bias: bool, out: tuple[Tensor, Tensor, Tensor],
) -> None:
    """(d hidden, d weight, d bias) of ``sum_r grad_divergence_r D_r + grad_nll_r NLL_r`` (None: 0), the blocks of
    :func:`linear_divergence` run again; a gradient not needed is empty. d(weight) and d(bias) are summed in fp32."""
    student, teacher = _heads(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, scale, softcap,
                              teacher_scale, teacher_softcap)
    opts = DivergenceOptions(inv_temperature, divergence, beta, ignore_index, False, backend)
    grads = zero_grads(hidden, weight, bias, (need_hidden, need_weight, need_bias), hidden.dtype)
    g_soft = torch.zeros_like(mask) if grad_divergence is None else grad_divergence.float().contiguous()
    g_hard = None if grad_nll is None else grad_nll.float().contiguous()
    run_blocks(student, teacher, mask, labels, g_soft, g_hard, opts, grads)
    for result, acc in zip(out, grads):
        if acc is not None:
            result.copy_(acc)


_OTHER_INPUTS = 15  # the op's inputs after (hidden, weight, bias): none differentiable (the teacher is constant)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, th, tw, tb, mask, labels, *args = inputs
    save_for_backward(ctx, hidden, weight, bias, th, tw, tb, mask, labels)
    ctx.args = tuple(args[:-2])  # scale .. ignore_index (nll is not needed)
    ctx.backend = args[-1]
    ctx.mark_non_differentiable(output[1])  # the entropy: a metric
    ctx.set_materialize_grads(False)


def _backward(ctx, g_div, _g_ent, g_nll):
    need = [bool(n) for n in ctx.needs_input_grad[:3]]
    hidden, weight, bias, th, tw, tb, mask, labels = ctx.saved_tensors
    need[2] = need[2] and bias is not None
    if not any(need) or (g_div is None and g_nll is None):
        return (None,) * (3 + _OTHER_INPUTS)
    g_nll = g_nll if labels is not None and g_nll is not None and g_nll.numel() else None
    grads = linear_divergence_backward(g_div, g_nll, hidden, weight, bias, th, tw, tb, mask, labels, *ctx.args,
                                       ctx.backend, *need)
    return (*(g if n else None for g, n in zip(grads, need)), *((None,) * _OTHER_INPUTS))


linear_divergence.register_autograd(_backward, setup_context=_setup_context)
