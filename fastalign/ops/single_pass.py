"""Single pass of a loss through the LM head, a block of whole items (sequences, pairs) at a time.

When the loss is a sum of per-item terms (a token-level policy loss with step-wide normalisers
over whole sequences; a pair-separable preference loss over whole pairs), the gradient of each
token log-prob is known as soon as the log-probs of its item are. So each block of items goes
through the head once (:mod:`fastalign.ops.linear_block`): logits kept, statistics, the block's
d loss / d lp (and d loss / d entropy) from the caller's callback, then d(logits) in place and
the gradients of hidden, weight and bias, before the next block. With ``s_k`` the block's share
of the loss (any function whose gradient with respect to the block's statistics is the loss's)
and ``z`` its kept logits:

    lp, aux            = stats(z)                 (aux: sum p^2, the entropy or the mean logit, when asked)
    g_lp, g_aux        = d s_k / d (lp, aux)      (autograd through the callback, [b, T] grids)
    dh, dW, db        += d(lp, aux)/d(h, W, b) · g    (block_backward: three matrix products per block)

three matrix products per block instead of the four of a forward plus a recomputing backward.
An item's token rows may come from several tensors (the chosen and rejected sides of a pair):
each is a *side* ``[B, T_s, H]`` with its labels; item ``i`` is row ``i`` of every side. The
loss value (and its metrics) comes from the whole batch's statistics; the backward only scales
the accumulated gradients by the incoming gradient. The callbacks are the caller's: this layer
knows items, rows and the logit pipeline, not the loss.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastalign.ops._launch import eager, refuse_second_derivative
from fastalign.ops.device_compaction import compact
from fastalign.ops.linear_block import (BLOCK_STATS, block_backward, block_buffer, block_dtype, block_forward,
                                        block_logprobs, block_rows, forward_grads, kept_rows)

#: Memory for the kept logits of one block, in MiB, on a GPU (bf16/fp16 logits: thousands of rows, so the
#: products run at full size) and on the CPU (fp32 logits of a few sequences; each block adds once to the fp32
#: d(weight)). ``FASTALIGN_BLOCK_MIB`` overrides both; its former name ``FASTALIGN_PAIR_BLOCK_MIB`` is read too.
DEFAULT_BLOCK_MIB = 1024.0
DEFAULT_CPU_BLOCK_MIB = 64.0

#: The per-token statistic a loss may read beside the log-prob: its gradient flows (entropy, mean_logit) or not
#: (sum_p2).
AUX_STATS = (None, "sum_p2", "entropy", "mean_logit")
DIFFERENTIABLE_AUX = ("entropy", "mean_logit")


def env_mib(name: str, default: float, *former: str) -> float:
    """The memory budget, in MiB, set by the environment variable ``name`` (or by its former names
    ``former``, in order), else ``default``. A set value must be a finite number > 0: anything else
    raises ``ValueError`` naming the variable and its value."""
    for var in (name, *former):
        value = os.environ.get(var)
        if value is not None:
            break
    else:
        return default
    try:
        mib = float(value)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib > 0):
        raise ValueError(f"{var} must be a positive number of MiB, got {value!r}")
    return mib


def block_budget_rows(vocab: int, like: Tensor, tiles: int = 1) -> int:
    """Rows of kept logits per block: the ``FASTALIGN_BLOCK_MIB`` budget (by default 1024 MiB on a GPU,
    64 MiB on the CPU; a finite number > 0, see :func:`env_mib`) over ``tiles`` rows of ``vocab`` logits in
    the block buffer's dtype (``tiles``: the ``[rows, V]`` buffers a block holds, e.g. 2 with the softcap
    derivative beside the logits; at least one row)."""
    default = DEFAULT_BLOCK_MIB if like.is_cuda else DEFAULT_CPU_BLOCK_MIB
    mib = env_mib("FASTALIGN_BLOCK_MIB", default, "FASTALIGN_PAIR_BLOCK_MIB")
    return block_rows(vocab, like, mib * (1 << 20) / tiles)


def refuse_traced(single_pass, *tensors: Optional[Tensor]) -> None:
    """``single_pass=True`` needs a plain :func:`~fastalign.ops._launch.eager` call: a ``ValueError`` naming it under
    ``torch.compile`` (or fake tensors), where the two passes run."""
    if single_pass is True and not eager(*tensors):
        raise ValueError("single_pass=True does not apply: under torch.compile (or fake tensors) the two passes run")


def differentiated(*tensors) -> bool:
    """Whether autograd may ask for the gradient of one of ``tensors`` (grad mode on, one requires it): the
    single pass runs only then (True included: without gradients the forward pass is all there is to do)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def by_default(weight: Tensor, *inputs, item_rows: int = 1) -> bool:
    """Whether ``single_pass="auto"`` takes the single pass: gradients are needed (of ``weight`` or one of
    ``inputs``) and it :func:`pays_off`."""
    return differentiated(weight, *inputs) and pays_off(weight, *inputs, item_rows=item_rows)


def pays_off(weight: Tensor, *inputs, item_rows: int = 1) -> bool:
    """Whether the single pass pays off where gradients are needed: the call is eager
    (:func:`~fastalign.ops._launch.eager`: under tracing the two-pass custom ops run), one item's logits
    (``item_rows`` rows, its padded length over every side) fit the block budget (:func:`block_budget_rows`: a
    longer item would be one block above the budget, where the two passes stay within their chunks), and it
    is faster: on a GPU (its blocks keep the input dtype), and on the CPU for an fp32 head (a bf16/fp16 one
    would be converted to fp32 whole, for every block); not for :func:`fp16_on_gpu` inputs."""
    tensors = (weight, *inputs)
    fits = item_rows <= block_budget_rows(weight.shape[0], inputs[0] if inputs else weight)
    on_device = weight.is_cuda or weight.dtype == torch.float32
    return fits and on_device and not fp16_on_gpu(*tensors) and eager(*tensors)


def rows_take_single_pass(single_pass, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], *others) -> bool:
    """Whether a loss over blocks of rows (each row its own item: no item outgrows a block) takes the single pass:
    where autograd may ask for a gradient of ``hidden``, ``weight`` or ``bias`` (:func:`differentiated`), for
    ``single_pass=True`` (checked by :func:`refuse_traced`), or ``"auto"`` in a plain eager call of every tensor
    (``others`` too), except for :func:`fp16_on_gpu` heads."""
    auto = single_pass == "auto" and eager(hidden, weight, bias, *others) and not fp16_on_gpu(hidden, weight)
    return (single_pass is True or auto) and differentiated(hidden, weight, bias)


def fp16_on_gpu(*tensors) -> bool:
    """Whether one of ``tensors`` is an fp16 GPU tensor, which ``single_pass="auto"`` leaves to the two passes: the
    single pass forms d(logits) before the backward brings the loss scale (``torch.amp.GradScaler``), and on a GPU
    they are fp16 operands, in whose range the small ones would be lost; the two passes take them scaled. (On the
    CPU the blocks are fp32.)"""
    return any(t is not None and t.is_cuda and t.dtype == torch.float16 for t in tensors)


class LogitPipeline(NamedTuple):
    """The logit pipeline and the kernel family of the blocks (docs/math.md#token-statistics)."""

    scale: float
    softcap: float  # 0: off
    inv_t: float
    ignore_index: int
    backend: str


class Side(NamedTuple):
    """One tensor of token rows: ``hidden [B, T, H]``, ``labels [B, T]`` and ``rows``, the sorted flat
    indices of its labelled positions (only those go through the head), or None for every position;
    ``low_rank_hidden [B, T, r]``: the rows' input to a low-rank term on the head (``a`` of ``a @ L.T``,
    a LoRA adapter's ``s A(h)``), with ``low_rank_weight`` of :func:`single_pass_loss`."""

    hidden: Tensor
    labels: Tensor
    rows: Optional[Tensor] = None
    low_rank_hidden: Optional[Tensor] = None


#: share(lp grids [b, T_s] per side, aux grids per side (or Nones), items) -> a 0-dim tensor whose gradient
#: with respect to the grids is the loss's
BlockShare = Callable[[list, list, slice], Tensor]
#: total(lp [B, T_s] per side, aux per side) -> (loss, metrics) of the whole batch
BatchLoss = Callable[[list, list], Tuple[Tensor, dict]]


def block_logprobs_of(h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      pipe: LogitPipeline) -> Tensor:
    """fp32 log-probs of the rows ``h [n, H]`` (no gradient), a budget of rows at a time."""
    return block_logprobs(h, weight, bias, labels.to(torch.int64).contiguous(),
                          rows=block_budget_rows(weight.shape[0], h), **pipe._asdict())


def token_items(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t [N, T, ...]`` as ``[N * T, 1, ...]``: every position its own item, for a loss separable over tokens
    (blocks of any tokens, sized by the budget alone); None stays None."""
    return None if t is None else t.reshape(-1, 1, *t.shape[2:])


#: The value of each statistic at an unlabelled position (no vocabulary work there).
UNLABELLED = {"logprobs": 0.0, "entropy": 0.0, "sum_p2": 1.0, "argmax": -1, "mean_logit": 0.0}


def single_pass_loss(sides: Sequence[Side], weight: Tensor, bias: Optional[Tensor], share: BlockShare,
                     total: BatchLoss, *, pipe: LogitPipeline, aux: Optional[str] = None, extras: Sequence[str] = (),
                     low_rank_weight: Optional[Tensor] = None,
                     nan_gradients: bool = False) -> Tuple[Tensor, dict, dict]:
    """``(loss, metrics, stats)`` of items spread over ``sides``; the gradients of every side's hidden
    states, ``weight`` and ``bias`` (and of the low-rank term: every side's ``low_rank_hidden`` and
    ``low_rank_weight [V, r]``) are computed here, block by block. ``aux``: one of :data:`AUX_STATS`,
    passed to the callbacks. ``stats``: name -> one detached tensor per side, shaped like its labels, of
    ``"logprobs"``, ``aux`` and the ``extras`` (statistics of :data:`~fastalign.ops.linear_block.BLOCK_STATS`
    kept for the caller, e.g. entropies and argmax for metrics, with no gradient); an unlabelled position
    holds :data:`UNLABELLED`. ``nan_gradients``: a NaN loss makes the gradients of the head and of every labelled
    row NaN (an unlabelled row's stay 0), on the device: for a loss whose two passes carry a NaN of one item to
    every item's gradient (ORPO's NLL), which a block's share cannot see in another block."""
    if aux not in AUX_STATS:
        raise ValueError(f"aux must be one of {AUX_STATS}, got {aux!r}")
    unknown = set(extras) - set(BLOCK_STATS)
    if unknown:
        raise ValueError(f"extras must be among {BLOCK_STATS}, got {sorted(unknown)}")
    low = [s.low_rank_hidden for s in sides]
    if any((a is None) != (low_rank_weight is None) for a in low):
        raise ValueError("low_rank_weight and every side's low_rank_hidden go together")
    out: dict = {}
    names = tuple(dict.fromkeys(([aux] if aux else []) + list(extras)))
    state = ([(s.labels, s.rows) for s in sides], share, total, pipe, aux, names, nan_gradients, out)
    loss = _SinglePass.apply(weight, bias, low_rank_weight, state, *(s.hidden for s in sides),
                             *(a for a in low if a is not None))
    return loss, out["metrics"], out["stats"]


def _side_rows(labels: Tensor, rows: Optional[Tensor], p0: int, p1: int) -> Tensor:
    """Flat row indices (into ``hidden.reshape(-1, H)``) of items ``p0..p1-1`` on one side."""
    T = labels.shape[1]
    if rows is None:
        return torch.arange(p0 * T, p1 * T, device=labels.device)
    lo, hi = torch.searchsorted(rows, torch.tensor([p0 * T, p1 * T], device=rows.device)).tolist()
    return rows[lo:hi]


class _SinglePass(torch.autograd.Function):
    """Loss value from the whole batch; d(hidden) of every side, d(weight), d(bias) (and the low-rank
    term's) summed block by block in the forward and scaled by the incoming gradient in the backward: once per
    forward, and without a second derivative (the gradients are constants to autograd)."""

    @staticmethod
    def forward(ctx, weight, bias, low_rank_weight, state, *row_inputs):
        side_labels, share, total, pipe, aux, names, nan_gradients, out = state
        kw = pipe._asdict()
        n = len(side_labels)
        # the per-row inputs, kind by kind: hidden states, then the low-rank term's inputs (if any)
        kinds = [row_inputs[:n]] + ([row_inputs[n:]] if low_rank_weight is not None else [])
        hiddens = kinds[0]
        B, V = hiddens[0].shape[0], weight.shape[0]
        need = ctx.needs_input_grad
        # d(weight) (and d(low_rank_weight)) summed over the blocks in fp32 (one rounding, in backward)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[0] else None
        db = torch.zeros(V, dtype=torch.float32, device=weight.device) if bias is not None and need[1] else None
        dl = (torch.zeros(low_rank_weight.shape, dtype=torch.float32, device=weight.device)
              if low_rank_weight is not None and need[2] else None)
        # d(hidden) (and the low-rank term's input's) in the blocks' dtype (fp32 on the CPU), scaled in backward
        d_rows = [[torch.zeros(t.shape, dtype=block_dtype(t), device=t.device) if need[4 + j * n + i] else None
                   for i, t in enumerate(kind)] for j, kind in enumerate(kinds)]
        flats = [[t.reshape(-1, t.shape[-1]) for t in kind] for kind in kinds]
        y_flat = [y.reshape(-1).to(torch.int64) for y, _rows in side_labels]
        # every statistic of every side, UNLABELLED where not computed (sum p^2 = 1: a WPO weight of log 1 = 0)
        every = {name: [torch.full(y.shape, UNLABELLED[name], device=y.device,
                                   dtype=torch.int64 if name == "argmax" else torch.float32)
                        for y, _rows in side_labels]
                 for name in ("logprobs", *names)}
        lp_all = every["logprobs"]
        aux_all = every[aux] if aux else [None] * n

        # items per block: their rows' logits within the budget (at least one item)
        if all(rows is None for _y, rows in side_labels):
            per_item = sum(y.shape[1:].numel() for y, _rows in side_labels)
        else:
            per_item = -(-sum(y.numel() if rows is None else rows.numel() for y, rows in side_labels) // max(B, 1))
        tiles = 2 if pipe.softcap > 0 else 1  # the logits, and the softcap derivative beside them
        k = max(1, min(B, block_budget_rows(V, hiddens[0], tiles) // max(per_item, 1)))
        # rows not found on the host: the Triton paths put a block's labelled rows first on the device and
        # multiply only those (ops/device_compaction.py)
        compacts = pipe.backend != "cpp" and all(rows is None for _y, rows in side_labels)
        buf = None
        for p0 in range(0, B, k):
            p1 = min(B, p0 + k)
            idx = [_side_rows(y, rows, p0, p1) for y, rows in side_labels]
            sizes = [i.numel() for i in idx]
            blocks = [torch.cat([f.index_select(0, i) for f, i in zip(flat, idx)]) for flat in flats]
            y_blk = torch.cat([y.index_select(0, i) for y, i in zip(y_flat, idx)])
            cmp = compact(y_blk, pipe.ignore_index) if compacts else None
            if cmp is not None:
                blocks, y_blk = [cmp.gather(b) for b in blocks], cmp.gather(y_blk)
            h_blk = blocks[0]
            low_rank = None if low_rank_weight is None else (blocks[1], low_rank_weight)
            if buf is None or buf.numel() < h_blk.shape[0] * V:
                buf = deriv_buf = None  # free the smaller buffers before the larger ones are allocated
                buf = block_buffer(max(h_blk.shape[0], k * per_item), V, hiddens[0])
                deriv_buf = torch.empty_like(buf) if pipe.softcap > 0 else None
            live = None if cmp is None else cmp.live
            with torch.no_grad():
                z, deriv, lp, extra, lse, log_c = block_forward(buf, h_blk, weight, bias, y_blk, stats=names,
                                                                low_rank=low_rank, live=live, deriv_buf=deriv_buf,
                                                                **kw)
            aux_blk = extra.get(aux)
            in_order = (lambda t: t) if cmp is None else (lambda t: None if t is None else cmp.scatter(t))
            labelled = y_blk != pipe.ignore_index
            for name in names:  # the extras (and aux) of these items at their positions, UNLABELLED where ignored
                part = torch.where(labelled, extra[name], UNLABELLED[name])
                for side, (ids, piece) in enumerate(zip(idx, in_order(part).split(sizes))):
                    every[name][side].view(-1).index_copy_(0, ids, piece)
            for side, (ids, part) in enumerate(zip(idx, in_order(lp).split(sizes))):
                lp_all[side].view(-1).index_copy_(0, ids, part)
            if not any(need):  # no gradient is asked for (the statistics alone): no derivative work
                continue
            # d (block's share of the loss) / d (lp, aux), on [b, T] grids of these items
            with torch.enable_grad():
                grids, aux_grids = [], []
                for side in range(n):
                    grids.append(lp_all[side][p0:p1].detach().requires_grad_())
                    aux_grids.append(None if aux is None else aux_all[side][p0:p1].detach().requires_grad_(
                        aux in DIFFERENTIABLE_AUX))
                s = share(grids, aux_grids, slice(p0, p1))
                wrt = grids + (aux_grids if aux in DIFFERENTIABLE_AUX else [])
                g = torch.autograd.grad(s, wrt, allow_unused=True, materialize_grads=True)

            def rows_of(grads):
                flat_g = torch.cat([gr.reshape(-1).index_select(0, ids - p0 * y.shape[1])
                                    for gr, ids, (y, _rows) in zip(grads, idx, side_labels)]).float()
                return (flat_g if cmp is None else cmp.gather(flat_g)).contiguous()

            g_aux = rows_of(g[len(grids):]) if aux in DIFFERENTIABLE_AUX else None
            d_blocks = block_backward(z, deriv, rows_of(g[:len(grids)]), h_blk, weight, y_blk, lse,
                                      g_ent=g_aux if aux == "entropy" else None,
                                      ent=aux_blk if aux == "entropy" else None,
                                      g_mean=g_aux if aux == "mean_logit" else None, dw=dw, db=db, low_rank=low_rank,
                                      dl=dl, live=live, log_c=log_c, **kw)
            if live is None:  # every row went through the head: an unlabelled row's d(logits) is 0, but 0 times a
                # NaN or inf of the head is NaN; its gradient is 0 (its statistics are constants), as past ``live``
                d_blocks = tuple(None if d is None else kept_rows(d, labelled) for d in d_blocks)
            for d_blk, d_sides in zip(d_blocks, d_rows):  # (dh, da) of the block, back to their sides
                for d_side, ids, part in zip(d_sides, idx, in_order(d_blk).split(sizes)):
                    if d_side is not None:
                        d_side.view(-1, part.shape[-1]).index_copy_(0, ids, part.to(d_side.dtype))
        del buf
        with torch.no_grad():
            loss, metrics = total(lp_all, aux_all)
        if nan_gradients:  # without a host sync: the flag stays on the device
            nan = loss.isnan()
            for d in (dw, db, dl):
                if d is not None:
                    d.masked_fill_(nan, math.nan)
            for d_sides in d_rows:
                for d, (y, _rows) in zip(d_sides, side_labels):
                    if d is not None:
                        d.masked_fill_(((y != pipe.ignore_index) & nan).unsqueeze(-1), math.nan)
        # kept as attributes, not saved tensors: backward scales them in place (no second [V, H])
        ctx.grads = (dw, db, dl, *(d for d_sides in d_rows for d in d_sides))
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (weight, bias, low_rank_weight, *row_inputs))
        out["metrics"], out["stats"] = metrics, every
        return loss

    @staticmethod
    def backward(ctx, g):
        refuse_second_derivative("single-pass loss")
        grads = forward_grads(ctx, g, "a loss")  # multiplied in fp32 by the unrounded incoming gradient
        n_rows = len(grads) - 3
        inputs = (0, 1, 2, *range(4, 4 + n_rows))  # (weight, bias, low_rank_weight, state, *rows): no state grad
        out = [None] * (4 + n_rows)
        for t, dtype, i in zip(grads, ctx.dtypes, inputs):
            if t is not None and ctx.needs_input_grad[i]:
                out[i] = t.to(dtype)
        return tuple(out)
