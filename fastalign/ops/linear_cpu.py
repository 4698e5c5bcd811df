"""The CPU path of ``fastalign::linear_stats``: BLAS products and the C++ row kernels.

Tokens x vocabulary chunks. Each chunk's logits ``z = softcap(scale * (h @ W.T + a @ L.T + b))``
(the low-rank term optional) come from BLAS products into a reused fp32 buffer; the C++ row
kernels of ``token_stats`` give the chunk's (max, log s, entropy, sum p^2, argmax), the label
logit (and, for the mean logit, the sum of the logits) is read from its chunk, and the chunks of a row are merged by
:func:`~fastalign.ops.vocab_pieces.merge_pieces`. Backward recomputes each chunk, lets the C++
kernel write d(logits) in place (plus ``g_mean / V``, the mean logit's share) and accumulates
``dh += dz @ W_chunk``, ``dW_chunk += dz.T @ h``
(``da += dz @ L_chunk``, ``dL_chunk += dz.T @ a``) in fp32. Only the labelled rows (label !=
ignore_index, found on the host: CPU tensors only) go through these chunks; the rest are 0.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend
from fastalign.ops._launch import DTYPE_CODE, opt, ptr
from fastalign.ops.device_compaction import matmul_live
from fastalign.ops.vocab_pieces import PIECE_IGNORE, local_labels, log_mass, merge_pieces


def chunk_logits(buf: Tensor, h_c: Tensor, w_v: Tensor, b_v: Optional[Tensor], scale: float, softcap: float,
                 low_rank: Optional[tuple[Tensor, Tensor]] = None, live: Optional[Tensor] = None) -> Tensor:
    """``softcap(scale * (h_c @ w_v.T + a_c @ l_v.T + b_v))`` written into the flat buffer ``buf``
    (``low_rank = (a_c, l_v)`` optional). ``live``: only the first ``live`` rows are multiplied (a
    device count, :mod:`~fastalign.ops.device_compaction`); the others get the logits of ``h = 0``. The
    operands may be of a lower precision than ``buf`` (bf16 products into fp32 logits on a GPU)."""
    n, v = h_c.shape[0], w_v.shape[0]
    z = buf[: n * v].view(n, v)
    if b_v is None or low_rank is not None or live is not None or h_c.dtype != buf.dtype:
        matmul_into(z, h_c, w_v.t(), accumulate=False, live=live)
        if low_rank is not None:
            matmul_into(z, low_rank[0], low_rank[1].t(), accumulate=True, live=live)
        if b_v is not None:
            z.add_(b_v)
        if scale != 1.0:
            z.mul_(scale)
    else:
        torch.addmm(b_v, h_c, w_v.t(), beta=scale, alpha=scale, out=z)
    if softcap > 0:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def softcap_derivative(z: Tensor, softcap: float, scale: float, out: Optional[Tensor] = None) -> Tensor:
    """``d z / d u`` for ``z = softcap * tanh(scale * u / softcap)``: ``scale * (1 - (z / softcap)^2)``."""
    out = torch.empty_like(z) if out is None else out
    torch.mul(z, 1.0 / softcap, out=out)
    return out.square_().neg_().add_(1.0).mul_(scale)


def matmul_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool, live: Optional[Tensor] = None,
                live_dim: int = 0) -> None:
    """``out (+)= a @ b`` with fp32 accumulation inside the product; ``out`` may be fp32 while the
    operands are bf16/fp16 (on CUDA with torch >= 2.10 one cuBLAS call with ``out_dtype``; elsewhere via fp32
    copies).
    ``live``: over the first ``live`` rows of ``a`` (``live_dim`` 0) or of the shared dimension
    (``live_dim`` 1) only, counted on the device (:func:`~fastalign.ops.device_compaction.matmul_live`)."""
    if live is not None:
        matmul_live(out, a, b, live, live_dim, accumulate)
    elif out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.is_cuda and ADDMM_OUT_DTYPE:
        torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, out_dtype=out.dtype, out=out)
    elif out.is_cuda:
        upcast_matmul_into(out, a, b, accumulate)
    elif accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def out_dtype_addmm_supported(version: str) -> bool:
    """Whether this torch version's CUDA ``addmm(..., out_dtype=)`` takes ``self`` in the output's precision
    (fp32 ``self`` and ``out`` from bf16/fp16 operands): torch 2.10 and later."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2]) >= (2, 10)


ADDMM_OUT_DTYPE = out_dtype_addmm_supported(torch.__version__)

#: Elements of the fp32 operand copies :func:`upcast_matmul_into` holds at a time.
UPCAST_ELEMS = 1 << 24


def upcast_matmul_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` in ``out``'s precision from operands of another dtype: fp32 copies of a bounded slice
    of the shared dimension at a time (at most :data:`UPCAST_ELEMS` elements, one column at least)."""
    if not accumulate:
        out.zero_()
    step = max(1, UPCAST_ELEMS // max(a.shape[0] + b.shape[1], 1))
    for k in range(0, a.shape[1], step):
        out.addmm_(a[:, k:k + step].to(out.dtype), b[k:k + step].to(out.dtype))


def chunk_grad_to_inputs(dz: Tensor, deriv: Optional[Tensor], scale: float, softcap: float, h_c: Tensor,
                         w_v: Tensor, dh_c: Optional[Tensor], dw_v: Optional[Tensor], db_v: Optional[Tensor],
                         accumulate: bool = True, low_rank: Optional[tuple[Tensor, Tensor]] = None,
                         low_rank_grads: tuple = (None, None), live: Optional[Tensor] = None) -> None:
    """From d(loss)/d(logits) of a chunk (``dz``, scaled in place to d(loss)/d(h W^T + b)):
    ``dh_c (+)= dz @ w_v``, ``dw_v += dz.T @ h_c``, ``db_v += dz.sum(0)``; with ``low_rank = (a_c, l_v)``
    also ``da_c (+)= dz @ l_v`` and ``dl_v += dz.T @ a_c`` into ``low_rank_grads = (da_c, dl_v)``.
    ``live``: the products take the first ``live`` rows only (a device count; the rows of ``dz`` past
    it are 0, and ``dh_c`` / ``da_c`` get 0 there)."""
    if softcap > 0:
        dz.mul_(deriv)
    elif scale != 1.0:
        dz.mul_(scale)
    rows, tokens = dict(live=live, live_dim=0), dict(live=live, live_dim=1)
    if dh_c is not None:
        matmul_into(dh_c, dz, w_v, accumulate=accumulate, **rows)
    if dw_v is not None:
        matmul_into(dw_v, dz.t(), h_c, accumulate=True, **tokens)
    da_c, dl_v = low_rank_grads
    if da_c is not None:
        matmul_into(da_c, dz, low_rank[1], accumulate=accumulate, **rows)
    if dl_v is not None:
        matmul_into(dl_v, dz.t(), low_rank[0], accumulate=True, **tokens)
    if db_v is not None:
        db_v += dz.sum(0, dtype=torch.float32).to(db_v.dtype)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


def _piece(a_c: Optional[Tensor], low_rank, v0: int, v1: int):
    """``(a_c, L[v0:v1])`` in fp32: the low-rank term of one chunk of tokens and vocabulary (None without one)."""
    return None if low_rank is None else (a_c, _f32(low_rank[1][v0:v1]))


def _rows_of(low_rank, rows: Tensor):
    """``low_rank`` with the rows ``rows`` of its ``a`` (``L`` is per vocabulary id)."""
    return None if low_rank is None else (low_rank[0].index_select(0, rows), low_rank[1])


def forward(hidden, weight, bias, low_rank, labels, scale, softcap, inv_t, ignore_index, out, nc, vc):
    """Per token chunk: each vocabulary piece's (max, log s, entropy, sum p^2, argmax) from the C++
    row kernel, the label logit gathered from its piece, then :func:`merge_pieces` and
    ``logprob = (z_y - z_max) / T - log S``. The pieces merge from their raw maxima ``z_max_k``, shifted by the
    row's before dividing by ``T`` (``(z_max_k - z_max) / T``), as the row kernel forms ``(z_j - z_max) / T``:
    the log-prob is within fp32 rounding of itself at any ``|z| / T``, not of ``|z| / T`` (``lse`` is then
    rounded once, ``z_max / T + log S``, and ``log c`` is that rounding, :func:`log_mass` of ``z_max / T`` kept
    exact: the backward's offsets ``z_j / T - lse`` form the product exactly too)."""
    _lp, ent, sp2, amax, _amax_val, _lse, mean, _log_c = out
    N, V = hidden.shape[0], weight.shape[0]
    C = _backend.compiled()
    buf = torch.empty(min(nc, N) * min(vc, V), dtype=torch.float32)
    K = -(-V // vc)
    inv_t32 = torch.tensor(inv_t, dtype=torch.float32).double()  # 1 / T rounded to fp32, as the C++ kernels take it
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        n = n1 - n0
        h_c = _f32(hidden[n0:n1])
        a_c = None if low_rank is None else _f32(low_rank[0][n0:n1])
        y = labels[n0:n1]
        m_k, log_s_k, z_max_k = torch.empty(K, n), torch.empty(K, n), torch.empty(K, n)
        ent_k = torch.empty(K, n) if ent.numel() else None
        sp2_k = torch.empty(K, n) if sp2.numel() else None
        zy = torch.zeros(n)
        z_sum = torch.zeros(n) if mean.numel() else None
        amax_k = torch.empty(n, dtype=torch.int64) if amax.numel() else None
        best_val = torch.full((n,), float("-inf")) if amax.numel() else None
        best_idx = torch.zeros(n, dtype=torch.int64) if amax.numel() else None
        for k in range(K):
            v0, v1 = k * vc, min(V, (k + 1) * vc)
            z = chunk_logits(buf, h_c, _f32(weight[v0:v1]), _f32(None if bias is None else bias[v0:v1]),
                             scale, softcap, _piece(a_c, low_rank, v0, v1))
            yl = local_labels(y, v0, v1, ignore_index)
            C.token_stats_piece_fwd_cpu(
                z.data_ptr(), DTYPE_CODE[torch.float32], n, v1 - v0, n, 0, v1 - v0, yl.data_ptr(), inv_t,
                PIECE_IGNORE, ptr(None if ent_k is None else ent_k[k]), ptr(None if sp2_k is None else sp2_k[k]),
                ptr(amax_k), m_k[k].data_ptr(), log_s_k[k].data_ptr())
            torch.amax(z, 1, out=z_max_k[k])
            inside = yl >= 0
            zy = torch.where(inside, z.gather(1, yl.clamp_min(0).unsqueeze(1)).squeeze(1), zy)
            if z_sum is not None:
                z_sum += z.sum(1)
            if amax_k is not None:  # the piece's largest logit (at its argmax; NaN for a piece of NaN alone)
                piece_max = z.gather(1, amax_k[:, None]).squeeze(1)
                better = piece_max > best_val
                best_val = torch.where(better, piece_max, best_val)
                best_idx = torch.where(better, amax_k + v0, best_idx)
        z_max = z_max_k.amax(0)
        z_ref = torch.where(torch.isfinite(z_max), z_max, torch.zeros_like(z_max))  # a row of only -inf: 0
        if K == 1:
            log_S, m_ent, m_sp2 = log_s_k[0], opt(None if ent_k is None else ent_k[0]), \
                opt(None if sp2_k is None else sp2_k[0])
        else:  # each piece's max relative to the row's: (z_max_k - z_max) / T
            _, log_S, m_ent, m_sp2, _ = merge_pieces((z_max_k - z_ref) * inv_t, log_s_k, ent_k, sp2_k)
        m_lse = z_ref * inv_t + log_S
        write_stats(slice(n0, n1), y, V, ignore_index, (zy - z_ref) * inv_t - log_S, m_lse, m_ent,
                    m_sp2, best_idx, best_val, out, None if z_sum is None else z_sum / V,
                    log_mass(z_ref.double() * inv_t32, log_S, m_lse, y, ignore_index))


def write_stats(rows, y, V, ignore_index, m_lp, m_lse, m_ent, m_sp2, best_idx, best_val, out, m_mean, m_log_c):
    """Write the merged statistics of ``rows``; ignored rows give 0, out-of-range labels a NaN log-prob."""
    lp, ent, sp2, amax, amax_val, lse, mean, log_c = out
    ignored = y == ignore_index
    valid = (y >= 0) & (y < V)
    zero = torch.zeros((), dtype=torch.float32, device=y.device)
    lp[rows] = torch.where(ignored, zero, torch.where(valid, m_lp, float("nan")))
    lse[rows] = torch.where(ignored, zero, m_lse)
    log_c[rows] = m_log_c
    if m_ent is not None:
        ent[rows] = torch.where(ignored, zero, m_ent)
    if m_sp2 is not None:
        sp2[rows] = torch.where(ignored, zero, m_sp2)
    if m_mean is not None:
        mean[rows] = torch.where(ignored, zero, m_mean)
    if best_idx is not None:
        amax[rows] = best_idx
        amax_val[rows] = best_val


def labelled_rows(labels: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the rows of ``labels [N]`` whose label is not ``ignore_index``, or None when every row
    is labelled. Reads the count back to the host: for CPU tensors only (on a GPU it is a device sync)."""
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def scatter_labelled(values: Tensor, rows: Tensor, like: Tensor, fill: float) -> Tensor:
    """``values`` (of the rows :func:`labelled_rows` found) at those flat ``rows`` of a tensor shaped like
    ``like``, ``fill`` elsewhere; differentiable with respect to ``values``."""
    out = torch.full((like.numel(),), fill, dtype=values.dtype, device=values.device)
    return out.index_put((rows,), values).view(like.shape)


def forward_labelled(hidden, weight, bias, low_rank, labels, scale, softcap, inv_t, ignore_index, out, nc, vc):
    """:func:`forward` over the labelled rows only (ignored rows are 0 and cost no vocabulary
    work); with argmax every row is computed, since ignored rows keep their argmax."""
    rows = None if out[3].numel() else labelled_rows(labels, ignore_index)
    if rows is None:
        forward(hidden, weight, bias, low_rank, labels, scale, softcap, inv_t, ignore_index, out, nc, vc)
        return
    part = [torch.empty(rows.numel() if t.numel() else 0) for t in out]
    if rows.numel():
        forward(hidden.index_select(0, rows), weight, bias, _rows_of(low_rank, rows), labels.index_select(0, rows),
                scale, softcap, inv_t, ignore_index, part, nc, vc)
    for full, sub in zip(out, part):
        if full.numel():
            full.zero_().index_copy_(0, rows, sub)


def backward_labelled(g_lp, g_ent, g_sp2, hidden, weight, bias, low_rank, labels, lse, ent, sp2, scale, softcap,
                      inv_t, ignore_index, nc, vc, dh, dw, db, low_rank_grads, log_c, g_mean=None):
    """:func:`backward` over the labelled rows only: ignored rows get a zero d(hidden) (``dh`` comes
    zeroed) and add nothing to d(weight), d(bias)."""
    rows = labelled_rows(labels, ignore_index)
    if rows is None:
        backward(g_lp, g_ent, g_sp2, hidden, weight, bias, low_rank, labels, lse, ent, sp2, scale, softcap, inv_t,
                 ignore_index, nc, vc, dh, dw, db, low_rank_grads, log_c, g_mean)
        return
    if rows.numel() == 0:
        return

    def pick(t):
        return t if t is None or t.numel() == 0 else t.index_select(0, rows)

    da, dl = low_rank_grads
    dh_rows, da_rows = (None if g is None else torch.zeros((rows.numel(), g.shape[1]), dtype=g.dtype) for g in (dh, da))
    backward(pick(g_lp), pick(g_ent), pick(g_sp2), hidden.index_select(0, rows), weight, bias,
             _rows_of(low_rank, rows), labels.index_select(0, rows), pick(lse), pick(ent), pick(sp2), scale, softcap,
             inv_t, ignore_index, nc, vc, dh_rows, dw, db, (da_rows, dl), pick(log_c), pick(g_mean))
    for full, part in ((dh, dh_rows), (da, da_rows)):
        if full is not None:
            full.index_copy_(0, rows, part)


def backward(g_lp, g_ent, g_sp2, hidden, weight, bias, low_rank, labels, lse, ent, sp2, scale, softcap, inv_t,
             ignore_index, nc, vc, dh, dw, db, low_rank_grads, log_c, g_mean=None):
    """Backward over token chunks; ``log_c``: the forward's correction of each row's ``log p`` (the rounding
    of its fp32 lse, :func:`log_mass`); ``g_mean``: the
    gradient of each row's mean logit (0 at the ignored rows), ``g_mean / V`` added to every d(logit)."""
    N, V = hidden.shape[0], weight.shape[0]
    C = _backend.compiled()
    buf = torch.empty(min(nc, N) * min(vc, V), dtype=torch.float32)
    dbuf = torch.empty_like(buf) if softcap > 0 else None
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        n = n1 - n0
        h_c = _f32(hidden[n0:n1])
        a_c = None if low_rank is None else _f32(low_rank[0][n0:n1])
        y = labels[n0:n1]
        dh_c = None if dh is None else dh[n0:n1]
        da_c = None if low_rank_grads[0] is None else low_rank_grads[0][n0:n1]
        dl = low_rank_grads[1]
        for v0 in range(0, V, vc):
            v1 = min(V, v0 + vc)
            w_v = _f32(weight[v0:v1])
            piece = _piece(a_c, low_rank, v0, v1)
            z = chunk_logits(buf, h_c, w_v, _f32(None if bias is None else bias[v0:v1]), scale, softcap, piece)
            deriv = softcap_derivative(z, softcap, scale, dbuf[: z.numel()].view_as(z)) if softcap > 0 else None
            yl = local_labels(y, v0, v1, ignore_index)
            sl = slice(n0, n1)
            C.token_stats_bwd_cpu(
                z.data_ptr(), DTYPE_CODE[torch.float32], n, v1 - v0, n, 0, v1 - v0, yl.data_ptr(), inv_t,
                PIECE_IGNORE, lse[sl].data_ptr(), log_c[sl].data_ptr(), ptr(opt(ent) if ent.numel() == 0 else ent[sl]),
                ptr(opt(sp2) if sp2.numel() == 0 else sp2[sl]),
                ptr(None if g_lp is None else g_lp[sl]), ptr(None if g_ent is None else g_ent[sl]),
                ptr(None if g_sp2 is None else g_sp2[sl]), z.data_ptr(), 0, v1 - v0)
            if g_mean is not None:  # d mean / d z_j = 1 / V
                z.add_(g_mean[sl, None] / V)
            chunk_grad_to_inputs(z, deriv, scale, softcap, h_c, w_v, dh_c, None if dw is None else dw[v0:v1],
                                 None if db is None else db[v0:v1], low_rank=piece,
                                 low_rank_grads=(da_c, None if dl is None else dl[v0:v1]))
