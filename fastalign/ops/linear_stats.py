"""``fastalign::linear_stats``: docs/math.md#token-statistics statistics straight from hidden states.

Logits ``z = softcap(scale * (h @ W.T + b)) / T`` are never stored for all
tokens at once. Forward and backward are custom ops (with fake implementations
and autograd), so ``torch.compile(fullgraph=True)`` sees one node each.

* ``cpp`` (CPU tensors): tokens x vocabulary chunks. Each chunk's logits come
  from one BLAS product into a reused fp32 buffer; the C++ row kernels of
  ``token_stats`` give the chunk's (max, log s, entropy, sum p^2, argmax), the
  label logit is read from its chunk, and chunks over the vocabulary are merged
  with :func:`merge_pieces`. Backward
  recomputes each chunk, lets the C++ kernel write d(logits) in place and
  accumulates ``dh += dz @ W_chunk``, ``dW_chunk += dz.T @ h`` in fp32. Only the labelled rows
  (label != ignore_index, found on the host) go through these chunks; the rest are 0.
* ``triton`` / ``cuda`` (CUDA tensors; CPU tensors in the interpreter): the
  Triton kernels of ``kernels/linear_stats.py`` tile tokens x vocabulary with
  ``tl.dot`` and keep online statistics; vocabulary splits are merged here.
  Backward recomputes logit tiles in Triton into a bounded token-chunk buffer of
  d(logits), then two matrix products per chunk.

Merging statistics of vocabulary pieces k (also across ranks for vocabulary
parallelism): with ``pi_k = exp(lse_k - lse)`` the mass of piece k,

    lse = log sum_k exp(lse_k),  H = sum_k pi_k (H_k - log pi_k),  sum_p2 = sum_k pi_k^2 sum_p2_k
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _backend
from fastalign.ops._launch import DTYPE_CODE, opt, ptr, stat_outputs, triton_kernels


def merge_pieces(m: Tensor, log_s: Tensor, ent: Optional[Tensor], sp2: Optional[Tensor]):
    """Merge statistics of disjoint vocabulary pieces ``[K, N]``, each given as its max ``m_k`` and
    ``log s_k = log sum_{j in k} exp(z_j - m_k)`` (so ``lse_k = m_k + log s_k``), into ``[N]``:
    ``(M, log S, entropy, sum_p2)`` with ``M = max_k m_k`` and ``lse = M + log S``.

    Only differences from ``M`` are summed, so ``(z_y - M) - log S`` is a log-prob exact to its own
    fp32 rounding at any logit scale. A piece with no mass (all logits -inf: ``m_k = -inf``) gets
    weight 0; a row of only such pieces gives ``log S = -inf``."""
    M = m.max(0).values
    M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    u = (m - M_safe) + log_s  # log of each piece's mass relative to exp(M)
    w = torch.exp(u)
    s = w.sum(0)
    log_S = torch.log(s)
    pi = w / s
    out_ent = out_sp2 = None
    if ent is not None:
        log_pi = torch.where(pi > 0, u - log_S, torch.zeros_like(pi))
        out_ent = torch.where(pi > 0, pi * (ent - log_pi), torch.zeros_like(pi)).sum(0)
    if sp2 is not None:
        out_sp2 = torch.where(pi > 0, pi * pi * sp2, torch.zeros_like(pi)).sum(0)
    return M_safe, log_S, out_ent, out_sp2


def merge_stats(lse: Tensor, ent: Optional[Tensor], sp2: Optional[Tensor]):
    """Merge per-piece statistics ``[K, N]`` (over disjoint vocabulary pieces) into ``[N]``."""
    M, log_S, out_ent, out_sp2 = merge_pieces(lse, torch.zeros_like(lse), ent, sp2)
    return M + log_S, out_ent, out_sp2


# Labels as the row kernels see them inside one vocabulary piece: a local id in [0, v1 - v0),
# PIECE_IGNORE for an ignored row, PIECE_ELSEWHERE for a label in another piece (or out of range).
# Both are negative, so no local id can ever be mistaken for an ignored row, whatever ignore_index.
PIECE_IGNORE = -1
PIECE_ELSEWHERE = -2


def local_labels(labels: Tensor, v0: int, v1: int, ignore_index: int) -> Tensor:
    """Labels relative to the vocabulary piece [v0, v1), for kernels run with ``PIECE_IGNORE``."""
    inside = (labels >= v0) & (labels < v1)
    local = torch.where(inside, labels - v0, PIECE_ELSEWHERE)
    return torch.where(labels == ignore_index, PIECE_IGNORE, local).contiguous()


def _outputs(hidden: Tensor, entropy: bool, sum_p2: bool, argmax: bool):
    return stat_outputs(hidden.shape[0], hidden.device, entropy, sum_p2, argmax, argmax_value=True)


# ----------------------------------------------------------------------------- CPU (BLAS + C++ row kernels)

def chunk_logits(buf: Tensor, h_c: Tensor, w_v: Tensor, b_v: Optional[Tensor], scale: float, softcap: float) -> Tensor:
    """fp32 ``softcap(scale * (h_c @ w_v.T + b_v))`` written into the flat buffer ``buf``."""
    n, v = h_c.shape[0], w_v.shape[0]
    z = buf[: n * v].view(n, v)
    if b_v is None:
        torch.mm(h_c, w_v.t(), out=z)
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


def chunk_grad_to_inputs(dz: Tensor, deriv: Optional[Tensor], scale: float, softcap: float, h_c: Tensor,
                         w_v: Tensor, dh_c: Optional[Tensor], dw_v: Optional[Tensor], db_v: Optional[Tensor],
                         accumulate: bool = True) -> None:
    """From d(loss)/d(logits) of a chunk (``dz``, scaled in place to d(loss)/d(h W^T + b)):
    ``dh_c (+)= dz @ w_v``, ``dw_v += dz.T @ h_c``, ``db_v += dz.sum(0)``."""
    if softcap > 0:
        dz.mul_(deriv)
    elif scale != 1.0:
        dz.mul_(scale)
    if dh_c is not None:
        if accumulate:
            dh_c.addmm_(dz, w_v)
        else:
            torch.mm(dz, w_v, out=dh_c)
    if dw_v is not None:
        dw_v.addmm_(dz.t().to(dw_v.dtype), h_c.to(dw_v.dtype))
    if db_v is not None:
        db_v += dz.sum(0, dtype=torch.float32).to(db_v.dtype)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


def _cpu_forward(hidden, weight, bias, labels, scale, softcap, inv_t, ignore_index, out, nc, vc):
    """Per token chunk: each vocabulary piece's (max, log s, entropy, sum p^2, argmax) from the C++
    row kernel, the label logit gathered from its piece, then :func:`merge_pieces` and
    ``logprob = (z_y - M) - log S``."""
    lp, ent, sp2, amax, amax_val, lse = out
    N, V = hidden.shape[0], weight.shape[0]
    C = _backend.compiled()
    buf = torch.empty(min(nc, N) * min(vc, V), dtype=torch.float32)
    K = -(-V // vc)
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        n = n1 - n0
        h_c = _f32(hidden[n0:n1])
        y = labels[n0:n1]
        m_k, log_s_k = torch.empty(K, n), torch.empty(K, n)
        ent_k = torch.empty(K, n) if ent.numel() else None
        sp2_k = torch.empty(K, n) if sp2.numel() else None
        zy = torch.zeros(n)
        amax_k = torch.empty(n, dtype=torch.int64) if amax.numel() else None
        best_val = torch.full((n,), float("-inf")) if amax.numel() else None
        best_idx = torch.zeros(n, dtype=torch.int64) if amax.numel() else None
        for k in range(K):
            v0, v1 = k * vc, min(V, (k + 1) * vc)
            z = chunk_logits(buf, h_c, _f32(weight[v0:v1]), _f32(None if bias is None else bias[v0:v1]),
                              scale, softcap)
            yl = local_labels(y, v0, v1, ignore_index)
            C.token_stats_piece_fwd_cpu(
                z.data_ptr(), DTYPE_CODE[torch.float32], n, v1 - v0, n, 0, v1 - v0, yl.data_ptr(), inv_t,
                PIECE_IGNORE, ptr(None if ent_k is None else ent_k[k]), ptr(None if sp2_k is None else sp2_k[k]),
                ptr(amax_k), m_k[k].data_ptr(), log_s_k[k].data_ptr())
            inside = yl >= 0
            zy_k = z.gather(1, yl.clamp_min(0).unsqueeze(1)).squeeze(1) * inv_t
            zy = torch.where(inside, zy_k, zy)
            if amax_k is not None:
                better = m_k[k] > best_val
                best_val = torch.where(better, m_k[k], best_val)
                best_idx = torch.where(better, amax_k + v0, best_idx)
        if K == 1:
            M, log_S, m_ent, m_sp2 = m_k[0], log_s_k[0], opt(None if ent_k is None else ent_k[0]), \
                opt(None if sp2_k is None else sp2_k[0])
        else:
            M, log_S, m_ent, m_sp2 = merge_pieces(m_k, log_s_k, ent_k, sp2_k)
        _write_stats(slice(n0, n1), y, V, ignore_index, (zy - M) - log_S, M + log_S, m_ent, m_sp2, best_idx,
                     best_val, out)


def _finish(rows, y, V, ignore_index, zy, m_lse, m_ent, m_sp2, best_idx, best_val, out):
    """Write the merged statistics of ``rows`` from the label logit ``zy`` and the merged ``lse``."""
    _write_stats(rows, y, V, ignore_index, zy - m_lse, m_lse, m_ent, m_sp2, best_idx, best_val, out)


def _write_stats(rows, y, V, ignore_index, m_lp, m_lse, m_ent, m_sp2, best_idx, best_val, out):
    """Write the merged statistics of ``rows``; ignored rows give 0, out-of-range labels a NaN log-prob."""
    lp, ent, sp2, amax, amax_val, lse = out
    ignored = y == ignore_index
    valid = (y >= 0) & (y < V)
    zero = torch.zeros((), dtype=torch.float32, device=y.device)
    lp[rows] = torch.where(ignored, zero, torch.where(valid, m_lp, float("nan")))
    lse[rows] = torch.where(ignored, zero, m_lse)
    if m_ent is not None:
        ent[rows] = torch.where(ignored, zero, m_ent)
    if m_sp2 is not None:
        sp2[rows] = torch.where(ignored, zero, m_sp2)
    if best_idx is not None:
        amax[rows] = best_idx
        amax_val[rows] = best_val


# |lse| from which backward renormalises a row (as the C++ token_stats backward): the saved fp32
# lse is off by up to ulp(lse) / 2, which reaches 2^-20 at 32 (and 5e-4 at 1e4).
RENORMALISE_ABOVE = 32.0


def far_rows(lse: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Rows backward renormalises: labelled, with ``|lse| >= RENORMALISE_ABOVE``."""
    return (lse.abs() >= RENORMALISE_ABOVE) & (labels != ignore_index)


def _mass(buf, h_c, weight, bias, y, lse_c, scale, softcap, inv_t, ignore_index, vc):
    """``c = sum_j exp(z_j / T - lse)`` over this weight's vocabulary for the rows of a token chunk that
    :func:`far_rows` selects (0 elsewhere), or None when there are none: one more sweep of logit
    chunks, only for rows of large logits or low temperature."""
    far = far_rows(lse_c, y, ignore_index)
    if not bool(far.any()):
        return None
    V = weight.shape[0]
    c = torch.zeros_like(lse_c)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        z = chunk_logits(buf, h_c, _f32(weight[v0:v1]), _f32(None if bias is None else bias[v0:v1]), scale, softcap)
        c += torch.exp(z * inv_t - lse_c.unsqueeze(1)).sum(1)
    return torch.where(far, c, 0.0)


def log_mass(c: Tensor, lse: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``log c`` on the :func:`far_rows`, 0 elsewhere (the correction backward applies to log p)."""
    return torch.where(far_rows(lse, labels, ignore_index), torch.log(c), 0.0).contiguous()


def row_mass(hidden, weight, bias, labels, lse, scale, softcap, inv_t, ignore_index, backend, nc, vc) -> Tensor:
    """:func:`_mass` of every row (0 off the :func:`far_rows`), over this weight's vocabulary: summed
    across vocabulary shards it is the whole row's mass."""
    if backend != "cpp":
        return triton_kernels("linear_stats").linear_row_mass(
            hidden, weight, bias, labels, lse, scale, softcap, inv_t, ignore_index, RENORMALISE_ABOVE)
    N = hidden.shape[0]
    c = torch.zeros(N, dtype=torch.float32)
    buf = torch.empty(min(nc, max(N, 1)) * min(vc, weight.shape[0]), dtype=torch.float32)
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        part = _mass(buf, _f32(hidden[n0:n1]), weight, bias, labels[n0:n1], lse[n0:n1], scale, softcap, inv_t,
                     ignore_index, vc)
        if part is not None:
            c[n0:n1] = part
    return c


def labelled_rows(labels: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the rows of ``labels [N]`` whose label is not ``ignore_index``, or None when every row
    is labelled. Reads the count back to the host: for CPU tensors only (on a GPU it is a device sync)."""
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def _cpu_forward_labelled(hidden, weight, bias, labels, scale, softcap, inv_t, ignore_index, out, nc, vc):
    """:func:`_cpu_forward` over the labelled rows only (ignored rows are 0 and cost no vocabulary
    work); with argmax every row is computed, since ignored rows keep their argmax."""
    rows = None if out[3].numel() else labelled_rows(labels, ignore_index)
    if rows is None:
        _cpu_forward(hidden, weight, bias, labels, scale, softcap, inv_t, ignore_index, out, nc, vc)
        return
    part = [torch.empty(rows.numel() if t.numel() else 0) for t in out]
    if rows.numel():
        _cpu_forward(hidden.index_select(0, rows), weight, bias, labels.index_select(0, rows), scale, softcap,
                     inv_t, ignore_index, part, nc, vc)
    for full, sub in zip(out, part):
        if full.numel():
            full.zero_().index_copy_(0, rows, sub)


def _cpu_backward_labelled(g_lp, g_ent, g_sp2, hidden, weight, bias, labels, lse, ent, sp2, scale, softcap,
                           inv_t, ignore_index, nc, vc, dh, dw, db, log_c=None):
    """:func:`_cpu_backward` over the labelled rows only: ignored rows get a zero d(hidden) (``dh`` comes
    zeroed) and add nothing to d(weight), d(bias)."""
    rows = labelled_rows(labels, ignore_index)
    if rows is None:
        _cpu_backward(g_lp, g_ent, g_sp2, hidden, weight, bias, labels, lse, ent, sp2, scale, softcap, inv_t,
                      ignore_index, nc, vc, dh, dw, db, log_c)
        return
    if rows.numel() == 0:
        return

    def pick(t):
        return t if t is None or t.numel() == 0 else t.index_select(0, rows)

    dh_rows = None if dh is None else torch.zeros((rows.numel(), dh.shape[1]), dtype=dh.dtype)
    _cpu_backward(pick(g_lp), pick(g_ent), pick(g_sp2), hidden.index_select(0, rows), weight, bias,
                  labels.index_select(0, rows), pick(lse), pick(ent), pick(sp2), scale, softcap, inv_t,
                  ignore_index, nc, vc, dh_rows, dw, db, pick(log_c))
    if dh is not None:
        dh.index_copy_(0, rows, dh_rows)


def _cpu_backward(g_lp, g_ent, g_sp2, hidden, weight, bias, labels, lse, ent, sp2, scale, softcap, inv_t,
                  ignore_index, nc, vc, dh, dw, db, log_c=None):
    """Backward over token chunks; ``log_c`` (the rows' log mass over the whole vocabulary, given when
    the weight is one shard of it) or, without it, the mass of this weight's vocabulary."""
    N, V = hidden.shape[0], weight.shape[0]
    C = _backend.compiled()
    buf = torch.empty(min(nc, N) * min(vc, V), dtype=torch.float32)
    dbuf = torch.empty_like(buf) if softcap > 0 else None
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        n = n1 - n0
        h_c = _f32(hidden[n0:n1])
        y = labels[n0:n1]
        dh_c = None if dh is None else dh[n0:n1]
        if log_c is not None:
            log_c_c = log_c[n0:n1]
        else:
            c = _mass(buf, h_c, weight, bias, y, lse[n0:n1], scale, softcap, inv_t, ignore_index, vc)
            log_c_c = None if c is None else log_mass(c, lse[n0:n1], y, ignore_index)
        for v0 in range(0, V, vc):
            v1 = min(V, v0 + vc)
            w_v = _f32(weight[v0:v1])
            z = chunk_logits(buf, h_c, w_v, _f32(None if bias is None else bias[v0:v1]), scale, softcap)
            deriv = softcap_derivative(z, softcap, scale, dbuf[: z.numel()].view_as(z)) if softcap > 0 else None
            yl = local_labels(y, v0, v1, ignore_index)
            sl = slice(n0, n1)
            C.token_stats_piece_bwd_cpu(
                z.data_ptr(), DTYPE_CODE[torch.float32], n, v1 - v0, n, 0, v1 - v0, yl.data_ptr(), inv_t,
                PIECE_IGNORE, lse[sl].data_ptr(), ptr(log_c_c), ptr(opt(ent) if ent.numel() == 0 else ent[sl]),
                ptr(opt(sp2) if sp2.numel() == 0 else sp2[sl]),
                ptr(None if g_lp is None else g_lp[sl]), ptr(None if g_ent is None else g_ent[sl]),
                ptr(None if g_sp2 is None else g_sp2[sl]), z.data_ptr(), 0, v1 - v0)
            chunk_grad_to_inputs(z, deriv, scale, softcap, h_c, w_v, dh_c, None if dw is None else dw[v0:v1],
                                 None if db is None else db[v0:v1])


# ----------------------------------------------------------------------------- Triton

def _triton_forward(hidden, weight, bias, labels, scale, softcap, inv_t, ignore_index, out):
    """Per-split online statistics in Triton, merged per row by a second Triton kernel (no host math)."""
    triton_kernels("linear_stats").linear_stats_forward(hidden, weight, bias, labels, scale, softcap, inv_t,
                                                        ignore_index, out)


def gpu_chunk_tokens(n: int, vocab: int, elem_bytes: int) -> int:
    """Tokens per Triton backward chunk: a d(logits) buffer of at most 1 GiB in the input dtype
    (thousands of tokens at a 152k vocabulary, so the weight is streamed O(N / chunk) times)."""
    return triton_kernels("linear_stats").gpu_chunk_tokens(n, vocab, elem_bytes)


def _matmul_f32(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with fp32 accumulation inside the product; ``out`` may be fp32 while the
    operands are bf16/fp16 (on CUDA one cuBLAS call with ``out_dtype``; elsewhere via fp32 copies)."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.is_cuda:
        torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, out_dtype=out.dtype, out=out)
    elif accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _triton_backward(g_lp, g_ent, g_sp2, hidden, weight, bias, labels, lse, ent, sp2, scale, softcap, inv_t,
                     ignore_index, nc, skip_threshold, dh, dw, db, log_c=None):
    """Token chunks of ``nc`` rows: the Triton kernel writes the chunk's d(logits) in the input dtype,
    then ``dh[chunk] = du @ W`` (one product, fp32 accumulation, one rounding) and ``dW += du.T @ h``
    summed over chunks in fp32 (an fp32 buffer when ``dw`` is bf16/fp16 and there are several chunks;
    the caller casts once). Rows with ``|lse| >= RENORMALISE_ABOVE`` are renormalised by ``log_c``
    (given for a vocabulary shard, else one forward-like pass over the blocks that hold such rows)."""
    N, V = hidden.shape[0], weight.shape[0]
    K = triton_kernels("linear_stats")
    if log_c is None:
        c = row_mass(hidden, weight, bias, labels, lse, scale, softcap, inv_t, ignore_index, "triton", 0, 0)
        log_c = log_mass(c, lse, labels, ignore_index)
    nc = max(1, min(nc, N))
    buf = torch.empty(nc * V, dtype=hidden.dtype, device=hidden.device)
    starts = range(0, N, nc)
    dw_acc = dw
    if dw is not None and dw.dtype != torch.float32 and len(starts) > 1:
        dw_acc = torch.empty(dw.shape, dtype=torch.float32, device=dw.device)
    for i, n0 in enumerate(starts):
        n1 = min(N, n0 + nc)
        sl = slice(n0, n1)
        du = buf[: (n1 - n0) * V].view(n1 - n0, V)
        K.linear_stats_backward(
            hidden[sl], weight, bias, labels[sl], lse[sl], opt(ent[sl] if ent.numel() else None),
            opt(sp2[sl] if sp2.numel() else None), None if g_lp is None else g_lp[sl],
            None if g_ent is None else g_ent[sl], None if g_sp2 is None else g_sp2[sl],
            scale, softcap, inv_t, ignore_index, skip_threshold, du, log_c[sl])
        if dh is not None:
            _matmul_f32(dh[sl], du, weight, accumulate=False)
        if dw_acc is not None:
            _matmul_f32(dw_acc, du.t(), hidden[sl], accumulate=i > 0)
        if db is not None:
            db += du.sum(0, dtype=torch.float32).to(db.dtype)
    if dw_acc is not dw:
        dw.copy_(dw_acc)


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("fastalign::linear_stats", mutates_args=())
def linear_stats(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, scale: float, softcap: float,
    inv_temperature: float, ignore_index: int, entropy: bool, sum_p2: bool, argmax: bool, backend: str,
    chunk_tokens: int, chunk_vocab: int, skip_threshold: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (logprobs, entropy, sum_p2, argmax, argmax_logit, lse) for ``hidden [N, H]``, ``weight [V, H]``.

    ``softcap`` 0 means off. Unrequested outputs are empty. ``argmax_logit`` is the
    max of ``z / T`` (used to merge argmax across vocabulary shards).
    ``skip_threshold`` only affects the Triton backward.
    """
    out = _outputs(hidden, entropy, sum_p2, argmax)
    if hidden.shape[0] == 0:
        return out
    if backend == "cpp":
        _cpu_forward_labelled(hidden, weight, bias, labels, scale, softcap, inv_temperature, ignore_index, out,
                     chunk_tokens, chunk_vocab)
    else:  # every row: skipping ignored ones would need a bounded gather of the labelled rows (no host sync)
        _triton_forward(hidden, weight, bias, labels, scale, softcap, inv_temperature, ignore_index, out)
    return out


@linear_stats.register_fake
def _(hidden, weight, bias, labels, scale, softcap, inv_temperature, ignore_index, entropy, sum_p2, argmax,
      backend, chunk_tokens, chunk_vocab, skip_threshold):
    return _outputs(hidden, entropy, sum_p2, argmax)


def _grad_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias):
    native = hidden.is_cuda
    dh = torch.zeros(hidden.shape if need_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    w_dtype = weight.dtype if native else torch.float32
    dw = torch.zeros(weight.shape if need_weight else (0,), dtype=w_dtype, device=weight.device)
    b_dtype = bias.dtype if bias is not None else weight.dtype
    db = torch.zeros(bias.shape if (need_bias and bias is not None) else (0,), dtype=torch.float32,
                     device=weight.device)
    return dh, dw, db, b_dtype


@torch.library.custom_op("fastalign::linear_stats_backward", mutates_args=())
def linear_stats_backward(
    grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], grad_sum_p2: Optional[Tensor],
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor, entropy: Tensor,
    sum_p2: Tensor, scale: float, softcap: float, inv_temperature: float, ignore_index: int, backend: str,
    chunk_tokens: int, chunk_vocab: int, skip_threshold: float, need_hidden: bool, need_weight: bool,
    need_bias: bool, log_c: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias) in the input dtypes; a gradient not needed is an empty tensor.
    ``log_c``: the rows' log mass over the whole vocabulary when ``weight`` is one shard of it."""
    g = [None if x is None else x.contiguous().float() for x in (grad_logprobs, grad_entropy, grad_sum_p2)]
    if not entropy.numel():
        g[1] = None
    if not sum_p2.numel():
        g[2] = None
    need_weight_acc = need_weight
    dh_f32 = hidden.dtype != torch.float32 and not hidden.is_cuda
    dh, dw, db, b_dtype = _grad_outputs(hidden, weight, bias, need_hidden, need_weight, need_bias)
    if dh_f32 and need_hidden:
        dh32 = torch.zeros(hidden.shape, dtype=torch.float32)
    else:
        dh32 = dh
    if hidden.shape[0] and any(x is not None for x in g):
        args = (hidden, weight, bias, labels, lse, entropy, sum_p2, scale, softcap, inv_temperature, ignore_index)
        if backend == "cpp":
            _cpu_backward_labelled(*g, *args, chunk_tokens, chunk_vocab, dh32 if need_hidden else None,
                                   dw if need_weight_acc else None, db if db.numel() else None, log_c)
        else:
            _triton_backward(*g, *args, chunk_tokens, skip_threshold, dh32 if need_hidden else None,
                             dw if need_weight_acc else None, db if db.numel() else None, log_c)
    if dh32 is not dh:
        dh = dh32.to(hidden.dtype)
    return dh, dw.to(weight.dtype), db.to(b_dtype)


@linear_stats_backward.register_fake
def _(grad_logprobs, grad_entropy, grad_sum_p2, hidden, weight, bias, labels, lse, entropy, sum_p2, scale,
      softcap, inv_temperature, ignore_index, backend, chunk_tokens, chunk_vocab, skip_threshold, need_hidden,
      need_weight, need_bias, log_c=None):
    dh = hidden.new_empty(hidden.shape if need_hidden else (0,))
    dw = weight.new_empty(weight.shape if need_weight else (0,))
    b_dtype = bias.dtype if bias is not None else weight.dtype
    db = weight.new_empty(bias.shape if (need_bias and bias is not None) else (0,), dtype=b_dtype)
    return dh, dw, db


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, scale, softcap, inv_t, ignore_index, _e, _s, _a, backend, nc, vc,
     skip) = inputs
    _lp, ent, sp2, _amax, _amax_val, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent, sp2)
    ctx.args = (scale, softcap, inv_t, ignore_index, backend, nc, vc, skip)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lp, g_ent, g_sp2, _g_amax, _g_amax_val, _g_lse):
    hidden, weight, bias, labels, lse, ent, sp2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[1] or (bias is not None and need[2])):
        return (None,) * 15
    dh, dw, db = linear_stats_backward(g_lp, g_ent, g_sp2, hidden, weight, bias, labels, lse, ent, sp2,
                                       *ctx.args, bool(need[0]), bool(need[1]), bool(bias is not None and need[2]))
    return ((dh if need[0] else None), (dw if need[1] else None), (db if bias is not None and need[2] else None),
            *((None,) * 12))


linear_stats.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- vocabulary parallel

class VocabParallelStats(torch.autograd.Function):
    """Each rank holds rows [start, start + V_r) of the weight; labels are global ids.

    Forward: local statistics with local labels, then all-reduces (max of lse,
    sum of exp mass, sums of the mass-weighted entropy / sum p^2 terms and of the
    label logit, max / min for the argmax). Backward: each rank's d(logits)
    needs only the global per-token lse / entropy / sum p^2, so the local backward
    op runs unchanged; d(hidden) is summed over ranks (hidden is replicated).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, group, start, v_total, scale, softcap, inv_t, ignore_index,
                want_ent, want_sp2, want_amax, backend, nc, vc, skip):
        import torch.distributed as dist

        V_r = weight.shape[0]
        yl = local_labels(labels, start, start + V_r, ignore_index)
        lp, ent, sp2, amax, amax_val, lse = linear_stats(
            hidden, weight, bias, yl, scale, softcap, inv_t, PIECE_IGNORE, want_ent, want_sp2, want_amax,
            backend, nc, vc, skip)
        ignored = labels == ignore_index
        inside = (labels >= start) & (labels < start + V_r) & ~ignored
        m = lse.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        w = torch.exp(lse - m)
        s = w.clone()
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        g_lse = m + torch.log(s)
        pi = w / s
        terms = [torch.where(inside, lp + lse, 0.0)]
        if want_ent:
            log_pi = torch.where(pi > 0, lse - g_lse, 0.0)
            terms.append(torch.where(pi > 0, pi * (ent - log_pi), 0.0))
        if want_sp2:
            terms.append(pi * pi * sp2)
        packed = torch.stack(terms)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = (labels >= 0) & (labels < v_total)
        g_lp = torch.where(ignored, zero, torch.where(valid, packed[0] - g_lse, float("nan")))
        g_lse = torch.where(ignored, zero, g_lse)
        g_ent = torch.where(ignored, zero, packed[1]) if want_ent else ent
        g_sp2 = torch.where(ignored, zero, packed[-1]) if want_sp2 else sp2
        g_amax = amax
        if want_amax:
            best = amax_val.clone()
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
            cand = torch.where(amax_val == best, amax + start, torch.full_like(amax, v_total))
            dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
            g_amax = cand
        ctx.save_for_backward(hidden, weight, bias, yl, g_lse, g_ent, g_sp2)
        ctx.group = group
        ctx.args = (scale, softcap, inv_t, PIECE_IGNORE, backend, nc, vc, skip)
        ctx.mark_non_differentiable(g_amax)
        ctx.set_materialize_grads(False)
        return g_lp, g_ent, g_sp2, g_amax

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_sp2, _g_amax):
        import torch.distributed as dist

        hidden, weight, bias, yl, lse, ent, sp2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g_lp is None and g_ent is None and g_sp2 is None:
            return (None,) * 18
        scale, softcap, inv_t, ignore, backend, nc, vc, _skip = ctx.args
        # rows with |lse| >= RENORMALISE_ABOVE: their mass over the whole vocabulary, summed over the shards
        c = row_mass(hidden, weight, bias, yl, lse, scale, softcap, inv_t, ignore, backend, nc, vc)
        dist.all_reduce(c, op=dist.ReduceOp.SUM, group=ctx.group)
        dh, dw, db = linear_stats_backward(g_lp, g_ent, g_sp2, hidden, weight, bias, yl, lse, ent, sp2,
                                           *ctx.args, True, bool(need[1]), bool(bias is not None and need[2]),
                                           log_mass(c, lse, yl, ignore))
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        return ((dh if need[0] else None), (dw if need[1] else None),
                (db if bias is not None and need[2] else None), *((None,) * 15))
