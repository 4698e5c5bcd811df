"""Log-prob, entropy, sum p^2 and argmax of each logits row in one pass (docs/math.md#token-statistics).

Forward, one program per row, streaming the vocabulary in blocks of BLOCK_V
with x = z / T and running values relative to the running max m:

    s = sum e^{x - m},  t = sum e^{x - m} (x - m),  q = sum e^{2 (x - m)}

When a block raises the max from m to m' every running sum is rescaled by
a = e^{m - m'} (and t also shifts: t' = a (t + (m - m') s)). At the end
lse = m + log s, logprob = x_y - lse, entropy = log s - t / s, sum_p2 = q / s^2.

Backward, one program per (row, vocabulary block), log p = x - lse:

    dx_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) + 2 g_q p_j (p_j - sum_p2)

and dz = dx / T.
"""
import triton
import triton.language as tl


@triton.jit
def _row_start(ptr, r, inner, s_outer, s_inner):
    # Rows of a [outer, inner, V] view with arbitrary leading strides (int64 math).
    return ptr + (r // inner) * s_outer + (r % inner) * s_inner


@triton.jit
def token_stats_fwd_kernel(
    z_ptr, inner, s_outer, s_inner, labels_ptr,
    lp_ptr, ent_ptr, sp2_ptr, amax_ptr, lse_ptr,
    V, inv_t, ignore_index,
    WANT_ENT: tl.constexpr, WANT_SP2: tl.constexpr, WANT_AMAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = _row_start(z_ptr, r, inner, s_outer, s_inner)
    y = tl.load(labels_ptr + r)

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    q = tl.zeros([], tl.float32)
    best = tl.zeros([], tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        block_max = tl.max(x, 0)
        if WANT_AMAX:
            best = tl.where(block_max > m, start + tl.argmax(x, 0).to(tl.int64), best)
        m_new = tl.maximum(m, block_max)
        # m - m_new, kept finite while the row is still all -inf (then s = t = 0)
        diff = tl.maximum(m, -3e38) - tl.maximum(m_new, -3e38)
        a = tl.exp(diff)
        d = tl.maximum(x - m_new, -1e30)  # -inf logits: e = 0 and e * d = 0, not NaN
        e = tl.exp(d)
        t = a * (t + diff * s) + tl.sum(e * d, 0)
        s = a * s + tl.sum(e, 0)
        if WANT_SP2:
            q = a * a * q + tl.sum(e * e, 0)
        m = m_new

    if WANT_AMAX:
        tl.store(amax_ptr + r, best)
    ignored = y == ignore_index
    valid = (y >= 0) & (y < V)
    log_s = tl.log(s)
    lse = m + log_s
    x_y = tl.load(row + tl.where(valid, y, 0)).to(tl.float32) * inv_t
    lp = tl.where(valid, x_y - lse, float("nan"))
    tl.store(lp_ptr + r, tl.where(ignored, 0.0, lp))
    tl.store(lse_ptr + r, tl.where(ignored, 0.0, lse))
    if WANT_ENT:
        tl.store(ent_ptr + r, tl.where(ignored, 0.0, log_s - t / s))
    if WANT_SP2:
        tl.store(sp2_ptr + r, tl.where(ignored, 0.0, q / (s * s)))


@triton.jit
def token_stats_bwd_kernel(
    z_ptr, inner, s_outer, s_inner, labels_ptr,
    lse_ptr, ent_ptr, sp2_ptr, g_lp_ptr, g_ent_ptr, g_sp2_ptr,
    dz_ptr, g_outer, g_inner,
    V, inv_t, ignore_index,
    HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_SP2: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    row = _row_start(z_ptr, r, inner, s_outer, s_inner)
    drow = _row_start(dz_ptr, r, inner, g_outer, g_inner)
    y = tl.load(labels_ptr + r)
    keep = y != ignore_index

    lse = tl.load(lse_ptr + r)
    x = tl.load(row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_t
    logp = tl.maximum(x - lse, -1e30)  # -inf logits: p = 0, and no 0 * inf
    p = tl.exp(logp)
    dx = tl.zeros([BLOCK_V], tl.float32)
    if HAS_G_LP:
        g_lp = tl.load(g_lp_ptr + r)
        dx += g_lp * (tl.where(cols == y, 1.0, 0.0) - p)
    if HAS_G_ENT:
        dx -= tl.load(g_ent_ptr + r) * p * (logp + tl.load(ent_ptr + r))
    if HAS_G_SP2:
        dx += 2.0 * tl.load(g_sp2_ptr + r) * p * (p - tl.load(sp2_ptr + r))
    dx = tl.where(keep, dx * inv_t, 0.0)
    tl.store(drow + cols, dx.to(dz_ptr.dtype.element_ty), mask=in_row)


def _fwd_block(V):
    return min(triton.next_power_of_2(V), 4096)


def token_stats_forward(z3, labels, inv_t, ignore_index, lp, ent, sp2, amax, lse):
    """z3: [outer, inner, V] logits view (last dim contiguous); outputs preallocated (None = skip)."""
    outer, inner, V = z3.shape
    n = outer * inner
    if n == 0:
        return
    token_stats_fwd_kernel[(n,)](
        z3, inner, z3.stride(0), z3.stride(1), labels,
        lp, ent if ent is not None else lp, sp2 if sp2 is not None else lp,
        amax if amax is not None else labels, lse,
        V, inv_t, ignore_index,
        WANT_ENT=ent is not None, WANT_SP2=sp2 is not None, WANT_AMAX=amax is not None,
        BLOCK_V=_fwd_block(V), num_warps=8,
    )


def token_stats_backward(z3, labels, inv_t, ignore_index, lse, ent, sp2, g_lp, g_ent, g_sp2, dz3):
    """Writes d(logits) into dz3 ([outer, inner, V], may be z3 itself)."""
    outer, inner, V = z3.shape
    n = outer * inner
    if n == 0:
        return
    block = _fwd_block(V)
    dummy = lse
    token_stats_bwd_kernel[(n, triton.cdiv(V, block))](
        z3, inner, z3.stride(0), z3.stride(1), labels,
        lse, ent if ent is not None else dummy, sp2 if sp2 is not None else dummy,
        g_lp if g_lp is not None else dummy, g_ent if g_ent is not None else dummy,
        g_sp2 if g_sp2 is not None else dummy,
        dz3, dz3.stride(0), dz3.stride(1),
        V, inv_t, ignore_index,
        HAS_G_LP=g_lp is not None, HAS_G_ENT=g_ent is not None, HAS_G_SP2=g_sp2 is not None,
        BLOCK_V=block, num_warps=8,
    )
