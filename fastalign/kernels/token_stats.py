"""Log-prob, entropy, sum p^2 and argmax of each logits row in one pass (docs/math.md#token-statistics).

Forward, one program per row, x = z / T. The row is read in steps of a
[STEP_ROWS, LANES] tile (column ``start + k * LANES + lane``); every lane keeps
its own running state (m, s, t, q) of the columns it has seen (softmax_math:
s = sum e^{x - m}, t = sum e^{x - m} (x - m), q = sum e^{2 (x - m)}). A step
reduces the tile along STEP_ROWS only, which one thread holds, so the loop is
register arithmetic with no cross-warp reduction and no barrier; the lanes are
merged once at the end and

    lse = m + log s,  logprob = (x_y - m) - log s,  entropy = log s - t / s,  sum_p2 = q / s^2.

A row whose label is ``ignore_index`` is not read (its outputs are 0) unless its
argmax is asked for (the argmax of every row is reported).

Backward, one program per (row, vocabulary block), log p = (x - lse) - log c:

    dx_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) + 2 g_q p_j (p_j - sum_p2)

and dz = dx / T; an ignored row writes zeros without reading its logits. The saved
fp32 lse is off by up to ulp(lse) / 2 (<= 2^-20 below |lse| = 32, 5e-4 at 1e4), so
for rows with |lse| >= RENORMALISE_ABOVE the forward also writes

    log c = log sum_j e^{x_j - lse} = (m - lse) + log s

(the rounding of lse), and p is exact to fp32 rounding again with no other read of
the row.
"""
import triton
import triton.language as tl

from fastalign.kernels.launch import on_gpu, target_arch
from fastalign.kernels.softmax_math import NEG_INF, add_block, dlogits, exp, finish, lse_rounding, rescale

#: |lse| from which backward renormalises a row (as the C++ backward: ulp(32) / 2 = 2^-20).
RENORMALISE_ABOVE = 32.0


@triton.jit
def _row_start(ptr, r, inner, s_outer, s_inner):
    # Rows of a [outer, inner, V] view with arbitrary leading strides (int64 math).
    return ptr + (r // inner) * s_outer + (r % inner) * s_inner


@triton.jit
def _step(m, s, t, q, mz, best, z, x, start, lanes, WANT_ENT: tl.constexpr, WANT_SP2: tl.constexpr,
          WANT_AMAX: tl.constexpr, LANES: tl.constexpr):
    """Fold a [STEP_ROWS, LANES] tile of logits z (column start + k * LANES + lane), x = z / T, into the per-lane
    states."""
    if WANT_AMAX:  # first column of the lane's largest logit z (two logits may round to one z / T, as the C++
        # kernel's): only a strictly greater value replaces it. A NaN is left out (as -inf): compiled, tl.max
        # skips it but tl.argmax's compare-and-select may keep its index
        za = tl.where(z == z, z, float("-inf"))
        za_max = tl.max(za, 0)
        best = tl.where(za_max > mz, start + tl.argmax(za, 0) * LANES + lanes, best)
        mz = tl.maximum(mz, za_max)
    m, s, t, q = add_block(m, s, t, q, x, 0, WANT_ENT, WANT_SP2)
    return m, s, t, q, mz, best


@triton.jit
def token_stats_fwd_kernel(
    z_ptr, inner, s_outer, s_inner, labels_ptr,
    lp_ptr, ent_ptr, sp2_ptr, amax_ptr, lse_ptr, log_c_ptr,
    V, inv_t, ignore_index, renormalise_above,
    WANT_ENT: tl.constexpr, WANT_SP2: tl.constexpr, WANT_AMAX: tl.constexpr,
    LANES: tl.constexpr, STEP_ROWS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = _row_start(z_ptr, r, inner, s_outer, s_inner)
    y = tl.load(labels_ptr + r)
    ignored = y == ignore_index
    lanes = tl.arange(0, LANES)
    offs = tl.arange(0, STEP_ROWS)[:, None] * LANES + lanes[None, :]

    m = tl.full([LANES], NEG_INF, tl.float32)
    s = tl.zeros([LANES], tl.float32)
    t = tl.zeros([LANES], tl.float32)
    q = tl.zeros([LANES], tl.float32)
    mz = tl.full([LANES], NEG_INF, tl.float32)  # the lane's largest logit (argmax only)
    best = tl.zeros([LANES], tl.int32)
    end = V if WANT_AMAX else tl.where(ignored, 0, V)
    step = STEP_ROWS * LANES
    full_end = end - end % step
    for start in range(0, full_end, step):  # whole tiles: no bounds checks
        z = tl.load(row + start + offs).to(tl.float32)
        m, s, t, q, mz, best = _step(m, s, t, q, mz, best, z, z * inv_t, start, lanes, WANT_ENT, WANT_SP2,
                                     WANT_AMAX, LANES)
    if full_end < end:  # the last, partial tile
        cols = full_end + offs
        z = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s, t, q, mz, best = _step(m, s, t, q, mz, best, z, z * inv_t, full_end, lanes, WANT_ENT, WANT_SP2,
                                     WANT_AMAX, LANES)

    row_m = tl.max(m, 0)
    s, t, q = rescale(m, s, t, q, row_m)
    if WANT_AMAX:
        tl.store(amax_ptr + r, tl.min(tl.where(mz == tl.max(mz, 0), best, V), 0).to(tl.int64))
    valid = (y >= 0) & (y < V)
    x_y = tl.load(row + tl.where(valid & ~ignored, y, 0)).to(tl.float32) * inv_t
    s_row = tl.sum(s, 0)
    lse, lp, ent, sp2 = finish(row_m, s_row, tl.sum(t, 0), tl.sum(q, 0), x_y)
    tl.store(lp_ptr + r, tl.where(ignored, 0.0, tl.where(valid, lp, float("nan"))))
    tl.store(lse_ptr + r, tl.where(ignored, 0.0, lse))
    tl.store(log_c_ptr + r, lse_rounding(row_m, s_row, lse, ~ignored, renormalise_above))
    if WANT_ENT:
        tl.store(ent_ptr + r, tl.where(ignored, 0.0, ent))
    if WANT_SP2:
        tl.store(sp2_ptr + r, tl.where(ignored, 0.0, sp2))


@triton.jit
def token_stats_bwd_kernel(
    z_ptr, inner, s_outer, s_inner, labels_ptr,
    lse_ptr, log_c_ptr, ent_ptr, sp2_ptr, g_lp_ptr, g_ent_ptr, g_sp2_ptr,
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

    read = cols < tl.where(keep, V, 0)  # an ignored row is not read
    x = tl.load(row + cols, mask=read, other=float("-inf")).to(tl.float32) * inv_t
    g_lp = tl.load(g_lp_ptr + r) if HAS_G_LP else 0.0
    g_ent = tl.load(g_ent_ptr + r) if HAS_G_ENT else 0.0
    ent = tl.load(ent_ptr + r) if HAS_G_ENT else 0.0
    g_sp2 = tl.load(g_sp2_ptr + r) if HAS_G_SP2 else 0.0
    sp2 = tl.load(sp2_ptr + r) if HAS_G_SP2 else 0.0
    dx = dlogits(x, tl.load(lse_ptr + r), tl.load(log_c_ptr + r), cols == y, g_lp, g_ent, ent, g_sp2, sp2,
                 HAS_G_LP, HAS_G_ENT, HAS_G_SP2)
    dx = tl.where(keep, dx * inv_t, 0.0)
    tl.store(drow + cols, dx.to(dz_ptr.dtype.element_ty), mask=in_row)


def _lanes(V):
    return min(triton.next_power_of_2(max(V, 1)), 2048)


def _step_rows(lanes: int, compiled: bool) -> int:
    """Rows of the [STEP_ROWS, LANES] tile: four at the widest tile (more loads in flight per thread), except on
    sm_100 and later, whose ptxas holds the 8-warp program to 80 registers and spills there (the compile gate);
    two rows fit."""
    if lanes < 1024:
        return 2
    return 2 if compiled and target_arch() >= 100 else 4


def _bwd_block(V):
    return min(triton.next_power_of_2(max(V, 1)), 4096)


def token_stats_forward(z3, labels, inv_t, ignore_index, lp, ent, sp2, amax, lse, log_c):
    """z3: [outer, inner, V] logits view (last dim contiguous); outputs preallocated (None = skip; ``lp``, ``lse``
    and ``log_c`` always written)."""
    outer, inner, V = z3.shape
    n = outer * inner
    if n == 0:
        return
    lanes = _lanes(V)
    token_stats_fwd_kernel[(n,)](
        z3, inner, z3.stride(0), z3.stride(1), labels,
        lp, ent if ent is not None else lp, sp2 if sp2 is not None else lp,
        amax if amax is not None else labels, lse, log_c,
        V, inv_t, ignore_index, RENORMALISE_ABOVE,
        WANT_ENT=ent is not None, WANT_SP2=sp2 is not None, WANT_AMAX=amax is not None,
        LANES=lanes, STEP_ROWS=_step_rows(lanes, on_gpu(z3)), num_warps=8 if lanes >= 1024 else 4,
    )


def token_stats_backward(z3, labels, inv_t, ignore_index, lse, ent, sp2, g_lp, g_ent, g_sp2, dz3, log_c):
    """Writes d(logits) into dz3 ([outer, inner, V], may be z3 itself), given the forward's ``lse`` and ``log_c``
    (the rounding of that fp32 lse, removed from log p)."""
    outer, inner, V = z3.shape
    n = outer * inner
    if n == 0:
        return
    block = _bwd_block(V)
    dummy = lse
    token_stats_bwd_kernel[(n, triton.cdiv(V, block))](
        z3, inner, z3.stride(0), z3.stride(1), labels,
        lse, log_c, ent if ent is not None else dummy, sp2 if sp2 is not None else dummy,
        g_lp if g_lp is not None else dummy, g_ent if g_ent is not None else dummy,
        g_sp2 if g_sp2 is not None else dummy,
        dz3, dz3.stride(0), dz3.stride(1),
        V, inv_t, ignore_index,
        HAS_G_LP=g_lp is not None, HAS_G_ENT=g_ent is not None and ent is not None,
        HAS_G_SP2=g_sp2 is not None and sp2 is not None,
        BLOCK_V=block, num_warps=8,
    )
