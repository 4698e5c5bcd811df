"""docs/math.md#token-statistics statistics from hidden states: logit tiles by ``tl.dot``, never [N, V] in memory.

A logit tile for token rows r and vocabulary columns c is

    u = scale * (h[r] @ W[c].T + b[c]),   z = cap * tanh(u / cap) (if softcap),   x = z / T

accumulated in fp32 over blocks of the hidden dimension.

Forward, one program per (token block, vocabulary split), streaming its split in
blocks of BLOCK_V with running values relative to the running max m (starts at -inf):

    s = sum e^{x - m},  t = sum e^{x - m} (x - m),  q = sum e^{2 (x - m)},  zy = x_y

When a block raises the max from m to m' every running sum is rescaled by
a = e^{m - m'} (t also shifts: t' = a (t + (m - m') s)). Each split writes its
(m, s, t, q, zy) and argmax; the host merges the splits (ops/linear_stats.py).

Backward, one program per (token block, vocabulary block) of a token chunk,
with log p = x - lse, H the entropy and P = sum p^2 of the row:

    dx_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) + 2 g_P p_j (p_j - P)
    du_j = dx_j / T * (1 - (z_j / cap)^2 if softcap) * scale

written to a [chunk, V] buffer; d(hidden) = du @ W and d(weight) += du.T @ h are
matrix products on that buffer. With SKIP, a tile whose every |du| is below the
threshold is written as zeros (the softmax gradient is concentrated on few ids).
"""
import triton
import triton.language as tl


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, s_h, s_w, scale, cap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * s_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * s_w + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16/fp16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * scale
    if SOFTCAP:
        # tanh(v) = 1 - 2 / (e^{2v} + 1): exact limits +-1 when e^{2v} overflows or underflows
        z = cap * (1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0))
    return z


@triton.jit
def linear_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, aidx_ptr, aval_ptr,
    N, V, H, s_h, s_w, v_per_split, n_splits, scale, cap, inv_t,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WANT_SP2: tl.constexpr, WANT_AMAX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    sp = tl.program_id(1).to(tl.int64)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    v_lo = sp * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    q = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    best_val = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_hi
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, s_h, s_w, scale, cap,
                        HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        x = tl.where(col_ok[None, :], z * inv_t, float("-inf"))
        block_max = tl.max(x, 1)
        if WANT_AMAX:
            better = block_max > best_val
            best_idx = tl.where(better, v0 + tl.argmax(x, 1).to(tl.int64), best_idx)
            best_val = tl.where(better, block_max, best_val)
        m_new = tl.maximum(m, block_max)
        diff = tl.maximum(m, -3e38) - tl.maximum(m_new, -3e38)  # finite while m is still -inf
        a = tl.exp(diff)
        d = tl.maximum(x - m_new[:, None], -1e30)  # masked columns: e = 0, e * d = 0
        e = tl.exp(d)
        t = a * (t + diff * s) + tl.sum(e * d, 1)
        s = a * s + tl.sum(e, 1)
        if WANT_SP2:
            q = a * a * q + tl.sum(e * e, 1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)

    stride = n_splits * N
    base = part_ptr + sp * N + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + stride, s, mask=row_ok)
    tl.store(base + 2 * stride, t, mask=row_ok)
    tl.store(base + 3 * stride, q, mask=row_ok)
    tl.store(base + 4 * stride, zy, mask=row_ok)
    if WANT_AMAX:
        tl.store(aidx_ptr + sp * N + rows, best_idx, mask=row_ok)
        tl.store(aval_ptr + sp * N + rows, best_val, mask=row_ok)


@triton.jit
def linear_stats_bwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, sp2_ptr, g_lp_ptr, g_ent_ptr, g_sp2_ptr, du_ptr,
    N, V, H, s_h, s_w, s_du, scale, cap, inv_t, ignore_index, threshold,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_SP2: tl.constexpr, SKIP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    keep = (y != ignore_index) & row_ok

    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, s_h, s_w, scale, cap,
                    HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    logp = tl.minimum(tl.maximum(z * inv_t - lse[:, None], -1e30), 0.0)  # ignored rows have lse = 0
    p = tl.exp(logp)
    dx = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if HAS_G_LP:
        g_lp = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)
        dx += g_lp[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
    if HAS_G_ENT:
        g_h = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
        h_row = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        dx -= g_h[:, None] * p * (logp + h_row[:, None])
    if HAS_G_SP2:
        g_q = tl.load(g_sp2_ptr + rows, mask=row_ok, other=0.0)
        q_row = tl.load(sp2_ptr + rows, mask=row_ok, other=0.0)
        dx += 2.0 * g_q[:, None] * p * (p - q_row[:, None])
    du = dx * inv_t
    if SOFTCAP:
        r = z / cap
        du = du * (1.0 - r * r)
    du = tl.where(keep[:, None] & col_ok[None, :], du * scale, 0.0)
    if SKIP:
        du = tl.where(tl.max(tl.max(tl.abs(du), 1), 0) >= threshold, du, 0.0)
    tl.store(du_ptr + rows[:, None] * s_du + cols[None, :], du.to(du_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _config(hidden):
    """Tile sizes: tensor-core tiles on a GPU; small tiles (fast to interpret) on CPU tensors."""
    if hidden.is_cuda:
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, UPCAST=False), dict(num_warps=8, num_stages=3)
    return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32, UPCAST=True), {}


def _precision(hidden):
    return "ieee" if hidden.dtype.is_floating_point and hidden.element_size() == 4 else "tf32"


def linear_stats_forward(hidden, weight, bias, labels, scale, cap, inv_t, want_sp2, want_amax):
    """Per-split partial statistics: ([5, S, N] (m, s, t, q, zy), argmax ids [S, N], argmax logits [S, N])."""
    import torch

    N, H = hidden.shape
    V = weight.shape[0]
    blocks, launch = _config(hidden)
    bn, bv = blocks["BLOCK_N"], blocks["BLOCK_V"]
    v_blocks = triton.cdiv(V, bv)
    token_blocks = triton.cdiv(N, bn)
    if hidden.is_cuda:
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        splits = max(1, min(v_blocks, triton.cdiv(4 * sms, token_blocks)))
    else:
        splits = min(2, v_blocks)
    per = triton.cdiv(v_blocks, splits) * bv
    splits = triton.cdiv(V, per)  # every split holds at least one column
    parts = torch.empty(5, splits, N, device=hidden.device, dtype=torch.float32)
    aidx = torch.empty(splits if want_amax else 0, N, device=hidden.device, dtype=torch.int64)
    aval = torch.empty(splits if want_amax else 0, N, device=hidden.device, dtype=torch.float32)
    linear_stats_fwd_kernel[(token_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, labels, parts,
        aidx if want_amax else labels, aval if want_amax else parts,
        N, V, H, hidden.stride(0), weight.stride(0), per, splits, scale, cap if cap > 0 else 1.0, inv_t,
        HAS_BIAS=bias is not None, SOFTCAP=cap > 0, WANT_SP2=bool(want_sp2), WANT_AMAX=bool(want_amax),
        PRECISION=_precision(hidden), **blocks, **launch,
    )
    return parts, aidx, aval


def linear_stats_backward(hidden, weight, bias, labels, lse, ent, sp2, g_lp, g_ent, g_sp2,
                          scale, cap, inv_t, ignore_index, threshold, du):
    """Writes d(loss)/d(h @ W.T + b) for the token rows of ``hidden`` into ``du`` ([n, V])."""
    N, H = hidden.shape
    V = weight.shape[0]
    blocks, launch = _config(hidden)
    dummy = lse
    linear_stats_bwd_kernel[(triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(V, blocks["BLOCK_V"]))](
        hidden, weight, bias if bias is not None else hidden, labels, lse,
        ent if ent is not None else dummy, sp2 if sp2 is not None else dummy,
        g_lp if g_lp is not None else dummy, g_ent if g_ent is not None else dummy,
        g_sp2 if g_sp2 is not None else dummy, du,
        N, V, H, hidden.stride(0), weight.stride(0), du.stride(0), scale, cap if cap > 0 else 1.0, inv_t,
        ignore_index, threshold,
        HAS_BIAS=bias is not None, SOFTCAP=cap > 0, HAS_G_LP=g_lp is not None,
        HAS_G_ENT=g_ent is not None and ent is not None, HAS_G_SP2=g_sp2 is not None and sp2 is not None,
        SKIP=threshold > 0, PRECISION=_precision(hidden), **blocks, **launch,
    )
