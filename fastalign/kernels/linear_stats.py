"""docs/math.md#token-statistics statistics from hidden states: logit tiles by ``tl.dot``, never [N, V] in memory.

A logit tile for token rows r and vocabulary columns c is

    u = scale * (h[r] @ W[c].T + a[r] @ L[c].T + b[c]),   z = cap * tanh(u / cap) (if softcap),   x = z / T

accumulated in fp32 over blocks of the hidden dimension (``a @ L.T``, a low-rank adapter on the
head such as LoRA's ``s B A(h)``, is optional: its r columns follow the H). fp32 inputs multiply
in TF32 on a GPU by default (``FASTALIGN_FP32_MATMUL=ieee`` for full fp32
products); bf16/fp16 inputs multiply natively, always accumulating in fp32.

Forward, one program per (vocabulary split, token block), the split index the
fastest-varying, so the programs that run together share one block of hidden
states (read from HBM once, then from L2) and stream different weight rows.
Each program folds its split's tiles into running states (softmax_math:
s = sum e^{x - m}, t = sum e^{x - m} (x - m), q = sum e^{2 (x - m)}) plus the
label logit x_y and the argmax, and writes them per split; ``linear_stats_finish_kernel``
merges the splits of a row and writes

    lse = m + log s,  logprob = (x_y - m) - log s,  entropy = log s - t / s,  sum_p2 = q / s^2,
    mean_logit = (1/V) sum_j z_j        (WANT_MEAN: each split's sum of z, before the temperature)

Backward, one program per (token block, vocabulary block) of a token chunk,
with log p = x - lse, H the entropy and P = sum p^2 of the row:

    dx_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) + 2 g_P p_j (p_j - P)
    du_j = (dx_j / T + g_mean / V) * (1 - (z_j / cap)^2 if softcap) * scale     (g_mean: of the mean logit)

The saved fp32 lse is off by up to ulp(lse) / 2 (5e-4 of every p at |lse| = 1e4), so
for the labelled rows with |lse| >= 32 the finishing kernel also writes that rounding,
log c = log sum_j e^{x_j - lse} = (m - lse) + log s, and backward uses
log p = x - lse - log c: the softmax is renormalised, as in the token_stats and C++
backwards, with no other pass over the logits. For a vocabulary shard the caller merges
the shards' c first.

The result is written to a [chunk, V] buffer in the input dtype; d(hidden) = du @ W and
d(weight) += du.T @ h (and d(a) = du @ L, d(L) += du.T @ a) are matrix products on that
buffer (ops/linear_triton.py). d(bias) is a plain sum, so it comes from the fp32 tile, not that
buffer: with BIAS_GRAD each program also writes its tile's fp32 column sums

    db_part[token block, j] = sum over the block's rows r of du_rj      (d bias_j = sum over blocks)

into a [token blocks, V] fp32 buffer that the launcher sums over the blocks (fixed order, no atomics).
With SKIP, a tile whose every |du| is below the threshold is written as zeros
(the softmax gradient is concentrated on few ids); a tile holding a NaN is kept.
"""
import torch
import triton
import triton.language as tl

from fastalign.kernels.launch import matmul_precision, on_gpu, sm_count, target_arch, tiled
from fastalign.kernels.softmax_math import NEG_INF, add_block, dlogits, finish, lse_rounding, merge


@triton.jit
def _dot_over(acc, x_ptr, y_ptr, rows, cols, row_ok, col_ok, K, s_x, s_y,
              BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += x[rows, :K] @ y[cols, :K].T, BLOCK_H columns of the shared dimension at a time."""
    for k0 in range(0, K, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < K
        a = tl.load(x_ptr + rows[:, None] * s_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(y_ptr + cols[None, :] * s_y + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16/fp16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, a_ptr, l_ptr, rows, cols, row_ok, col_ok, H, R, s_h, s_w, s_a, s_l, scale, cap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, LOW_RANK: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    acc = _dot_over(tl.zeros([BLOCK_N, BLOCK_V], tl.float32), h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, s_h,
                    s_w, BLOCK_H, PRECISION, UPCAST)
    if LOW_RANK:  # + a[rows] @ L[cols].T: a low-rank adapter on the head, its r columns after the H
        acc = _dot_over(acc, a_ptr, l_ptr, rows, cols, row_ok, col_ok, R, s_a, s_l, BLOCK_H, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * scale
    if SOFTCAP:
        z = cap * _tanh(z / cap)
    return z


@triton.jit
def _tanh(v):
    """tanh to fp32 rounding at every v: (1 - e^{-2|v|}) / (1 + e^{-2|v|}) with the sign of v (exact limits
    +-1, no overflow), and below |v| = 1/4, where 1 - e^{-2|v|} cancels, the odd series to v^9 (its next term
    is 1.5e-8 of the sum there)."""
    a = tl.abs(v)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    near = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, near, far)
    return tl.where(v < 0, -t, t)


@triton.jit
def _empty_rows(BLOCK_N: tl.constexpr):
    """Running state of BLOCK_N rows before any logit: (max, sum e, sum e z, sum e^2, label logit,
    best logit, its index)."""
    zeros = tl.zeros([BLOCK_N], tl.float32)
    return (tl.full([BLOCK_N], NEG_INF, tl.float32), zeros, zeros, zeros, zeros,
            tl.full([BLOCK_N], float("-inf"), tl.float32), tl.zeros([BLOCK_N], tl.int64))


@triton.jit
def linear_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, a_ptr, l_ptr, labels_ptr, part_ptr, aidx_ptr, aval_ptr,
    N, V, H, R, s_h, s_w, s_a, s_l, v_per_split, n_splits, scale, cap, inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, LOW_RANK: tl.constexpr,
    WANT_ENT: tl.constexpr, WANT_SP2: tl.constexpr, WANT_AMAX: tl.constexpr, WANT_MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # one grid axis (the second is limited to 65535 blocks: 4M tokens), the splits of a token block adjacent so
    # they read its hidden tile from L2
    pid = tl.program_id(0).to(tl.int64)
    sp = pid % n_splits
    pid_n = pid // n_splits
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    v_lo = sp * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    if not WANT_AMAX:  # a block of ignored rows (prompt tokens) computes nothing
        v_hi = tl.where(tl.sum(((y != ignore_index) & row_ok).to(tl.int32), 0) > 0, v_hi, v_lo)

    m, s, t, q, zy, best_val, best_idx = _empty_rows(BLOCK_N)
    z_sum = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_hi
        z = _logit_tile(h_ptr, w_ptr, b_ptr, a_ptr, l_ptr, rows, cols, row_ok, col_ok, H, R, s_h, s_w, s_a, s_l,
                        scale, cap, HAS_BIAS, SOFTCAP, LOW_RANK, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        if WANT_AMAX:  # on the logits z, before the temperature (two of them may round to one z / T)
            # a NaN logit is passed over (the row's other logits decide, as on the CPU)
            za = tl.where(col_ok[None, :] & (z == z), z, float("-inf"))
            block_max = tl.max(za, 1)
            better = block_max > best_val
            best_idx = tl.where(better, v0 + tl.argmax(za, 1).to(tl.int64), best_idx)
            best_val = tl.where(better, block_max, best_val)
        x = tl.where(col_ok[None, :], z * inv_t, float("-inf"))
        m, s, t, q = add_block(m, s, t, q, x, 1, WANT_ENT, WANT_SP2)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)
        if WANT_MEAN:  # the logits before the temperature
            z_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)

    stride = n_splits * N
    base = part_ptr + sp * N + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + stride, s, mask=row_ok)
    tl.store(base + 2 * stride, t, mask=row_ok)
    tl.store(base + 3 * stride, q, mask=row_ok)
    tl.store(base + 4 * stride, zy, mask=row_ok)
    if WANT_MEAN:
        tl.store(base + 5 * stride, z_sum, mask=row_ok)
    if WANT_AMAX:
        tl.store(aidx_ptr + sp * N + rows, best_idx, mask=row_ok)
        tl.store(aval_ptr + sp * N + rows, best_val, mask=row_ok)


@triton.jit
def linear_stats_finish_kernel(
    part_ptr, aidx_ptr, aval_ptr, labels_ptr, lp_ptr, ent_ptr, sp2_ptr, amax_ptr, amax_val_ptr, lse_ptr, mean_ptr,
    logc_ptr, N, V, n_splits, ignore_index, renormalise_above,
    WANT_ENT: tl.constexpr, WANT_SP2: tl.constexpr, WANT_AMAX: tl.constexpr, WANT_MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Merge the per-split states of BLOCK_N rows (splits in order: deterministic) and write the outputs."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    stride = n_splits * N
    m, s, t, q, zy, best_val, best_idx = _empty_rows(BLOCK_N)
    z_sum = tl.zeros([BLOCK_N], tl.float32)
    for k in range(0, n_splits):
        base = part_ptr + k * N + rows
        m, s, t, q = merge(m, s, t, q, tl.load(base, mask=ok, other=NEG_INF), tl.load(base + stride, mask=ok, other=0.0),
                           tl.load(base + 2 * stride, mask=ok, other=0.0), tl.load(base + 3 * stride, mask=ok, other=0.0))
        zy += tl.load(base + 4 * stride, mask=ok, other=0.0)
        if WANT_MEAN:
            z_sum += tl.load(base + 5 * stride, mask=ok, other=0.0)
        if WANT_AMAX:
            val = tl.load(aval_ptr + k * N + rows, mask=ok, other=float("-inf"))
            better = val > best_val  # the first split wins ties: lowest index
            best_idx = tl.where(better, tl.load(aidx_ptr + k * N + rows, mask=ok, other=0), best_idx)
            best_val = tl.where(better, val, best_val)
    y = tl.load(labels_ptr + rows, mask=ok, other=ignore_index)
    ignored = y == ignore_index
    valid = (y >= 0) & (y < V)
    lse, lp, ent, sp2 = finish(m, s, t, q, zy)
    tl.store(lp_ptr + rows, tl.where(ignored, 0.0, tl.where(valid, lp, float("nan"))), mask=ok)
    tl.store(lse_ptr + rows, tl.where(ignored, 0.0, lse), mask=ok)
    tl.store(logc_ptr + rows, lse_rounding(m, s, lse, ~ignored, renormalise_above), mask=ok)
    if WANT_ENT:
        tl.store(ent_ptr + rows, tl.where(ignored, 0.0, ent), mask=ok)
    if WANT_SP2:
        tl.store(sp2_ptr + rows, tl.where(ignored, 0.0, sp2), mask=ok)
    if WANT_MEAN:
        tl.store(mean_ptr + rows, tl.where(ignored, 0.0, z_sum / V), mask=ok)
    if WANT_AMAX:
        tl.store(amax_ptr + rows, best_idx, mask=ok)
        tl.store(amax_val_ptr + rows, best_val, mask=ok)


@triton.jit
def linear_stats_bwd_kernel(
    h_ptr, w_ptr, b_ptr, a_ptr, l_ptr, labels_ptr, lse_ptr, logc_ptr, ent_ptr, sp2_ptr, g_lp_ptr, g_ent_ptr,
    g_sp2_ptr, g_mean_ptr, du_ptr, db_ptr, N, V, H, R, s_h, s_w, s_a, s_l, s_du, scale, cap, inv_t, ignore_index,
    threshold, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, LOW_RANK: tl.constexpr,
    HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_SP2: tl.constexpr, HAS_G_MEAN: tl.constexpr,
    SKIP: tl.constexpr,
    BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    keep = (y != ignore_index) & row_ok
    # a block of ignored rows (prompt tokens) multiplies nothing: its tile is all zeros
    any_kept = tl.sum(keep.to(tl.int32), 0) > 0
    h_end = tl.where(any_kept, H, 0)
    r_end = tl.where(any_kept, R, 0)

    z = _logit_tile(h_ptr, w_ptr, b_ptr, a_ptr, l_ptr, rows, cols, keep, col_ok, h_end, r_end, s_h, s_w, s_a, s_l,
                    scale, cap, HAS_BIAS, SOFTCAP, LOW_RANK, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
    g_lp = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)[:, None] if HAS_G_LP else 0.0
    g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)[:, None] if HAS_G_ENT else 0.0
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None] if HAS_G_ENT else 0.0
    g_sp2 = tl.load(g_sp2_ptr + rows, mask=row_ok, other=0.0)[:, None] if HAS_G_SP2 else 0.0
    sp2 = tl.load(sp2_ptr + rows, mask=row_ok, other=0.0)[:, None] if HAS_G_SP2 else 0.0
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    log_c = tl.load(logc_ptr + rows, mask=row_ok, other=0.0)[:, None]
    dx = dlogits(z * inv_t, lse, log_c, cols[None, :] == y[:, None], g_lp, g_ent, ent, g_sp2, sp2,
                 HAS_G_LP, HAS_G_ENT, HAS_G_SP2)
    du = dx * inv_t
    if HAS_G_MEAN:  # d mean / d z_j = 1 / V
        du += tl.load(g_mean_ptr + rows, mask=row_ok, other=0.0)[:, None] / V
    if SOFTCAP:
        r = z / cap
        du = du * (1.0 - r * r)
    du = tl.where(keep[:, None] & col_ok[None, :], du * scale, 0.0)
    if SKIP:
        # the tile's largest |du| against the threshold; a tile holding a NaN is kept, so that the NaN reaches
        # dh and dW as on the other backends (tl.max may drop a NaN, and NaN >= threshold is False)
        big = tl.max(tl.abs(du), axis=None) >= threshold
        has_nan = tl.sum((du != du).to(tl.int32), axis=None) > 0
        du = tl.where(big | has_nan, du, 0.0)
    tl.store(du_ptr + rows[:, None] * s_du + cols[None, :], du.to(du_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if BIAS_GRAD:  # db_part[token block, cols] = sum_r du[r, cols] in fp32, before du's rounding
        tl.store(db_ptr + tl.program_id(0).to(tl.int64) * V + cols, tl.sum(du, 0), mask=col_ok)


def _config(hidden, backward=False, mean_logit=False, argmax=False, reduces_tile=False):
    """Tile sizes: tensor-core tiles on a GPU, sized per architecture so that no bf16/fp16 variant
    spills (the AOT gate checks it); small tiles (fast to interpret) on CPU tensors. ``reduces_tile``: the backward
    reduces its d(logits) tile across rows (the skip test, the bias gradient)."""
    if not on_gpu(hidden):
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32, UPCAST=True), {}
    ieee = matmul_precision(hidden) == "ieee"
    # full-fp32 ("ieee") products run on the FMA units, whose operands spilled on sm_100 at 32 columns of H
    block_h = 64 if hidden.element_size() == 2 else 16 if ieee else 32
    # 128 x 128 forward tiles spill on sm_80 and sm_100, with full-fp32 products on sm_90, and there with the mean
    # logit's running sum or the argmax's tile of logits beside the other statistics
    if backward and reduces_tile and target_arch() == 80 and not ieee:
        # such a tile held 128 registers with 8 warps and spilled on sm_80 (Triton 3.6); 4 warps take 255, unspilled
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=block_h, UPCAST=False), dict(num_warps=4, num_stages=3)
    if backward or target_arch() != 90 or ieee or mean_logit or argmax:
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=block_h, UPCAST=False), dict(num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=block_h, UPCAST=False), dict(num_warps=8, num_stages=3)


def _low_rank_args(hidden, low_rank):
    """Kernel arguments ``(a, L, R, a.stride(0), L.stride(0))`` of the low-rank term ``a @ L.T``
    (dummies without one)."""
    if low_rank is None:
        return hidden, hidden, 0, 0, 0
    a, lw = low_rank
    return a, lw, a.shape[1], a.stride(0), lw.stride(0)


def _forward_parts(hidden, weight, bias, low_rank, labels, scale, cap, inv_t, ignore_index, want_ent, want_sp2,
                   want_amax, want_mean=False, tiles=None):
    """Launch the forward kernel: per-split states ``parts [5, splits, N]`` (m, s, t, q, label logit; with
    ``want_mean`` a sixth, the sum of the logits) and, with ``want_amax``, the per-split argmax index and logit.
    ``tiles``: :func:`linear_stats_forward`'s."""
    import torch

    N, H = hidden.shape
    V = weight.shape[0]
    blocks, launch = tiled(_config(hidden, mean_logit=want_mean, argmax=want_amax), tiles,
                           ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
    bn, bv = blocks["BLOCK_N"], blocks["BLOCK_V"]
    v_blocks = triton.cdiv(V, bv)
    token_blocks = triton.cdiv(N, bn)
    if on_gpu(hidden):
        splits = max(1, min(v_blocks, triton.cdiv(4 * sm_count(hidden.device), token_blocks)))
    else:
        splits = min(2, v_blocks)
    per = triton.cdiv(v_blocks, splits) * bv
    splits = triton.cdiv(V, per)  # every split holds at least one column
    parts = torch.empty(6 if want_mean else 5, splits, N, device=hidden.device, dtype=torch.float32)
    aidx = torch.empty(splits if want_amax else 0, N, device=hidden.device, dtype=torch.int64)
    aval = torch.empty(splits if want_amax else 0, N, device=hidden.device, dtype=torch.float32)
    a, lw, R, s_a, s_l = _low_rank_args(hidden, low_rank)
    linear_stats_fwd_kernel[(splits * token_blocks,)](
        hidden, weight, bias if bias is not None else hidden, a, lw, labels, parts,
        aidx if want_amax else labels, aval if want_amax else parts,
        N, V, H, R, hidden.stride(0), weight.stride(0), s_a, s_l, per, splits, scale, cap if cap > 0 else 1.0,
        inv_t, ignore_index, HAS_BIAS=bias is not None, SOFTCAP=cap > 0, LOW_RANK=low_rank is not None,
        WANT_ENT=want_ent, WANT_SP2=want_sp2, WANT_AMAX=want_amax, WANT_MEAN=want_mean,
        PRECISION=matmul_precision(hidden), **blocks, **launch,
    )
    return parts, aidx, aval, splits


def linear_stats_forward(hidden, weight, bias, low_rank, labels, scale, cap, inv_t, ignore_index, out,
                         renormalise_above, tiles=None):
    """Writes ``out`` = (logprobs, entropy, sum_p2, argmax, argmax logit, lse, mean logit, log c); unrequested ones
    are empty. ``log c`` is the saved lse's rounding at the labelled rows with ``|lse| >= renormalise_above``
    (0 elsewhere), which backward removes from ``log p``.
    ``tiles``: the launch, ``(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages)``, instead of the default
    (benchmarks/lm_head_tilings.py compares them)."""
    lp, ent, sp2, amax, amax_val, lse, mean, log_c = out
    N = hidden.shape[0]
    V = weight.shape[0]
    want_ent, want_sp2, want_amax, want_mean = (bool(t.numel()) for t in (ent, sp2, amax, mean))
    parts, aidx, aval, splits = _forward_parts(hidden, weight, bias, low_rank, labels, scale, cap, inv_t,
                                               ignore_index, want_ent, want_sp2, want_amax, want_mean, tiles)
    finish_rows = 128 if on_gpu(hidden) else 16
    linear_stats_finish_kernel[(triton.cdiv(N, finish_rows),)](
        parts, aidx if want_amax else labels, aval if want_amax else parts, labels,
        lp, ent if want_ent else lp, sp2 if want_sp2 else lp, amax if want_amax else labels,
        amax_val if want_amax else lp, lse, mean if want_mean else lp, log_c, N, V, splits, ignore_index,
        renormalise_above,
        WANT_ENT=want_ent, WANT_SP2=want_sp2, WANT_AMAX=want_amax, WANT_MEAN=want_mean, BLOCK_N=finish_rows,
        num_warps=4,
    )


def linear_stats_backward(hidden, weight, bias, low_rank, labels, lse, ent, sp2, g_lp, g_ent, g_sp2,
                          scale, cap, inv_t, ignore_index, threshold, du, log_c, db=None, g_mean=None):
    """Writes d(loss)/d(h @ W.T + b) for the token rows of ``hidden`` into ``du`` ([n, V]); ``log_c``
    [n] corrects each row's log p (0: none). With ``db`` ([V]), adds the column sums of the fp32 d(logits)
    to it (per token block in the kernel, then over the blocks). ``g_mean``: the gradient of each row's mean
    logit (over this weight's vocabulary)."""
    N, H = hidden.shape
    V = weight.shape[0]
    blocks, launch = _config(hidden, backward=True, reduces_tile=threshold > 0 or db is not None)
    grid = (triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(V, blocks["BLOCK_V"]))
    dummy = lse
    db_part = None if db is None else torch.empty(grid[0], V, dtype=torch.float32, device=du.device)
    a, lw, R, s_a, s_l = _low_rank_args(hidden, low_rank)
    linear_stats_bwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, a, lw, labels, lse, log_c,
        ent if ent is not None else dummy, sp2 if sp2 is not None else dummy,
        g_lp if g_lp is not None else dummy, g_ent if g_ent is not None else dummy,
        g_sp2 if g_sp2 is not None else dummy, g_mean if g_mean is not None else dummy, du,
        db_part if db is not None else dummy,
        N, V, H, R, hidden.stride(0), weight.stride(0), s_a, s_l, du.stride(0), scale, cap if cap > 0 else 1.0,
        inv_t, ignore_index, threshold,
        HAS_BIAS=bias is not None, SOFTCAP=cap > 0, LOW_RANK=low_rank is not None, HAS_G_LP=g_lp is not None,
        HAS_G_ENT=g_ent is not None and ent is not None, HAS_G_SP2=g_sp2 is not None and sp2 is not None,
        HAS_G_MEAN=g_mean is not None, SKIP=threshold > 0, BIAS_GRAD=db is not None,
        PRECISION=matmul_precision(hidden), **blocks, **launch,
    )
    if db is not None:
        db += db_part.sum(0).to(db.dtype)
