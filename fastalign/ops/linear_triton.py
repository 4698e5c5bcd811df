"""The Triton path of ``fastalign::linear_stats`` (CUDA tensors; CPU tensors in the interpreter).

The kernels of ``fastalign/kernels/linear_stats.py`` tile tokens x vocabulary with ``tl.dot`` and keep online
statistics per vocabulary split; a second kernel merges the splits per row (no host math). Backward
recomputes logit tiles in Triton into a bounded token-chunk buffer of d(logits), then two matrix
products per chunk.
"""
from __future__ import annotations

import torch

from fastalign.ops._launch import opt, triton_kernels
from fastalign.ops.device_compaction import compact
from fastalign.ops.linear_cpu import matmul_into
from fastalign.ops.vocab_pieces import RENORMALISE_ABOVE


def forward(hidden, weight, bias, low_rank, labels, scale, softcap, inv_t, ignore_index, out):
    """Per-split online statistics in Triton, merged per row by a second Triton kernel (no host math).
    The labelled rows are put first (:func:`~fastalign.ops.device_compaction.compact`), so the blocks of
    ignored rows after them compute nothing; with argmax (defined on every row) all rows are computed."""
    K = triton_kernels("linear_stats")
    cmp = None if out[3].numel() else compact(labels, ignore_index)
    if cmp is None:
        K.linear_stats_forward(hidden, weight, bias, low_rank, labels, scale, softcap, inv_t, ignore_index, out,
                               RENORMALISE_ABOVE)
        return
    packed = [torch.empty_like(t) for t in out]
    K.linear_stats_forward(cmp.gather(hidden), weight, bias, _gathered(cmp, low_rank), cmp.gather(labels), scale,
                           softcap, inv_t, ignore_index, packed, RENORMALISE_ABOVE)
    for result, t in zip(out, packed):
        if result.numel():
            cmp.scatter(t, into=result)


def _gathered(cmp, low_rank):
    """The low-rank term ``(a, L)`` with the rows of ``a`` in compacted order."""
    return None if low_rank is None else (cmp.gather(low_rank[0]), low_rank[1])


#: The d(logits) buffer of one backward chunk on a GPU, in bytes.
GPU_CHUNK_BYTES = 1 << 30


def gpu_chunk_tokens(n: int, vocab: int, elem_bytes: int, budget: int = GPU_CHUNK_BYTES) -> int:
    """Tokens per Triton backward chunk: a d(logits) buffer of at most ``budget`` (1 GiB) bytes in the input
    dtype (thousands of tokens at a 152k vocabulary, so the weight is streamed O(N / chunk) times). Plain
    arithmetic, so a compiled graph computes it without importing the kernels."""
    return max(1, min(max(n, 1), budget // max(vocab * elem_bytes, 1)))


def backward(g_lp, g_ent, g_sp2, hidden, weight, bias, low_rank, labels, lse, ent, sp2, scale, softcap, inv_t,
             ignore_index, nc, skip_threshold, dh, dw, db, low_rank_grads, log_c, g_mean=None):
    """Token chunks of ``nc`` rows: the Triton kernel writes the chunk's d(logits) in the input dtype,
    then ``dh[chunk] = du @ W`` (one product, fp32 accumulation, one rounding) and ``dW += du.T @ h``
    summed over chunks in fp32 (an fp32 buffer when ``dw`` is bf16/fp16 and there are several chunks;
    the caller casts once); ``db`` gets the kernel's fp32 column sums of d(logits), before their rounding to
    the input dtype; likewise ``d a = du @ L`` and ``d L += du.T @ a`` for ``low_rank = (a, L)``
    into ``low_rank_grads``; ``g_mean``, the gradient of each row's mean logit, adds ``g_mean / V`` to its
    d(logits). ``log_c``, the forward's correction of each row's ``log p = z / T - lse - log c`` (the rounding
    of its fp32 lse at the rows with ``|lse| >= RENORMALISE_ABOVE``), renormalises those rows.

    The labelled rows are put first (:func:`~fastalign.ops.device_compaction.compact`) and the
    products of each chunk run over its labelled rows only (their count read on the device)."""
    cmp = compact(labels, ignore_index)
    if cmp is None:
        _chunks(g_lp, g_ent, g_sp2, hidden, weight, bias, low_rank, labels, lse, ent, sp2, scale, softcap, inv_t,
                ignore_index, nc, skip_threshold, dh, dw, db, low_rank_grads, log_c, g_mean, None)
        return
    gather = cmp.gather
    da, dl = low_rank_grads
    dh_c, da_c = (None if t is None else torch.empty_like(t) for t in (dh, da))
    _chunks(gather(g_lp), gather(g_ent), gather(g_sp2), gather(hidden), weight, bias, _gathered(cmp, low_rank),
            gather(labels), gather(lse), gather(ent) if ent.numel() else ent, gather(sp2) if sp2.numel() else sp2,
            scale, softcap, inv_t, ignore_index, nc, skip_threshold, dh_c, dw, db, (da_c, dl), gather(log_c),
            gather(g_mean), cmp)
    for result, t in ((dh, dh_c), (da, da_c)):
        if result is not None:
            cmp.scatter(t, into=result)


def _chunks(g_lp, g_ent, g_sp2, hidden, weight, bias, low_rank, labels, lse, ent, sp2, scale, softcap, inv_t,
            ignore_index, nc, skip_threshold, dh, dw, db, low_rank_grads, log_c, g_mean, cmp):
    """:func:`backward` chunk by chunk; ``cmp``: the rows are in compacted order, the products of a chunk
    stop at its last labelled row. Without it every row goes through the products and the unlabelled rows'
    d(hidden) (and d a) is set to 0 after them."""
    N, V = hidden.shape[0], weight.shape[0]
    K = triton_kernels("linear_stats")
    nc = max(1, min(nc, N))
    buf = torch.empty(nc * V, dtype=hidden.dtype, device=hidden.device)
    starts = range(0, N, nc)
    a, lw = low_rank if low_rank is not None else (None, None)
    da, dl = low_rank_grads
    dw_acc, dl_acc = (g if g is None or g.dtype == torch.float32 or len(starts) == 1 else
                      torch.empty(g.shape, dtype=torch.float32, device=g.device) for g in (dw, dl))
    for i, n0 in enumerate(starts):
        n1 = min(N, n0 + nc)
        sl = slice(n0, n1)
        du = buf[: (n1 - n0) * V].view(n1 - n0, V)
        K.linear_stats_backward(
            hidden[sl], weight, bias, None if a is None else (a[sl], lw), labels[sl], lse[sl],
            opt(ent[sl] if ent.numel() else None), opt(sp2[sl] if sp2.numel() else None),
            None if g_lp is None else g_lp[sl], None if g_ent is None else g_ent[sl],
            None if g_sp2 is None else g_sp2[sl],
            scale, softcap, inv_t, ignore_index, skip_threshold, du, log_c[sl], db,
            None if g_mean is None else g_mean[sl])
        live = None if cmp is None else cmp.live_in(n0, n1)
        rows, tokens = dict(live=live, live_dim=0), dict(live=live, live_dim=1)
        if dh is not None:
            matmul_into(dh[sl], du, weight, accumulate=False, **rows)
        if dw_acc is not None:
            matmul_into(dw_acc, du.t(), hidden[sl], accumulate=i > 0, **tokens)
        if da is not None:
            matmul_into(da[sl], du, lw, accumulate=False, **rows)
        if cmp is None:  # every row went through the products: an unlabelled row's d(logits) is 0, but 0 times a
            # NaN or inf of the head is NaN; its d(hidden) (and d a) is 0, as past ``live``
            unscored = (labels[sl] == ignore_index)[:, None]
            for d in (dh, da):
                if d is not None:
                    d[sl].masked_fill_(unscored, 0.0)
        if dl_acc is not None:
            matmul_into(dl_acc, du.t(), a[sl], accumulate=i > 0, **tokens)
    for result, acc in ((dw, dw_acc), (dl, dl_acc)):
        if acc is not result:
            result.copy_(acc)
