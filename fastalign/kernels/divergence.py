"""The distillation divergence of rows of student and teacher logits (docs/math.md#distillation-divergence).

One program per row of fp32 (or input-dtype) logits z_s, z_t; x = z / T. Three sweeps over the row in
tiles of BLOCK_V columns:

1. the online softmax states (softmax_math.add_block) of the student (with t, for its entropy), of the
   teacher and, with labels, of the student at temperature 1 (the NLL of Liger's hard loss);
2. D and K with lps = (x_s - m_s) - log s_s, lpt = (x_t - m_t) - log s_t (x - m first: the error is the
   log-prob's own rounding at any logit scale, not that of |lse|) floored at -1e30 (a zero probability adds 0,
   a NaN propagates):

       beta = 0: D = sum p_t (lpt - lps);        beta = 1: D = K = sum p_s (lps - lpt)
       else:     lm = log((1 - beta) p_s + beta p_t),
                 D = sum beta p_t (lpt - lm) + (1 - beta) p_s (lps - lm),   K = sum p_s (lps - lm)
       TVD (MODE 4): D = sum |p_s - p_t| / 2,  K = sum p_s s,  s = sign(p_s - p_t)

   or, for the cosine distance (MODE 3), its sums dot = x_s . x_t, ss = |x_s|^2, tt = |x_t|^2 and
   D = 1 - cos, cos = dot / (max(|x_s|, 1e-12) max(|x_t|, 1e-12)) (the norms floored as torch's F.normalize);
3. with gradients, dz_s = g_soft / T * dD/dx_s + g_hard (softmax(z_s) - 1[j = y]) written over the
   student row, with dD/dx_s = p_s - p_t, p_s (lps - lpt - K) or (1 - beta) p_s (lps - lm - K); TVD:
   p_s (s - K) / 2; cosine:
   (cos x_s / |x_s| - x_t / |x_t|) / |x_s| (without the cos term where |x_s| is at its floor).

A row whose mask is 0 writes zeros (and a zero gradient row) without reading its logits; a label equal
to ignore_index gives NLL 0 and no hard gradient, one outside [0, V) a NaN NLL (and gradient).

A row state (STATE_COLS floats: the two softmax states, the NLL's, K and the cosine's terms) is written by a call
without gradients (STATE_OUT) and read by a gradient call on the same rows (STATE_IN), which then runs sweep 3
alone and writes no D, entropy or NLL: the backward of token_divergence, one sweep over the rows.
"""
import math

import triton
import triton.language as tl

from fastalign.kernels.softmax_math import NEG_INF, add_block, exp

FLOOR: tl.constexpr = tl.constexpr(-1e30)
STATE_COLS: tl.constexpr = tl.constexpr(10)  # m_s, log_ss, m_t, log_st, m_1, log_s1, K, inv_ns, inv_nt, cos_s


@triton.jit
def _floor(x):
    """max(x, -1e30) that keeps a NaN (tl.maximum may drop it)."""
    return tl.where(x < FLOOR, FLOOR, x)


@triton.jit
def _sign(d):
    """-1, 0 or 1 (0 for a NaN: the NaN reaches the gradient through p_s)."""
    return tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))


@triton.jit
def _column(xs, xt, m_s, log_ss, m_t, log_st, log_1mb, log_b, MODE: tl.constexpr):
    """(lps, lpt, ps, pt, lm) of a tile of columns, from each side's max and log-sum."""
    lps = _floor((xs - m_s) - log_ss)
    lpt = _floor((xt - m_t) - log_st)
    ps = exp(lps)
    pt = exp(lpt)
    if MODE == 2:
        a = lps + log_1mb
        b = lpt + log_b
        hi = tl.maximum(a, b)
        lm = _floor(hi + tl.log(1.0 + exp(tl.minimum(a, b) - hi)) + (a - a) + (b - b))
    else:
        lm = lps
    return lps, lpt, ps, pt, lm


@triton.jit
def divergence_rows_kernel(
    zs_ptr, s_stride, zt_ptr, t_stride, mask_ptr, labels_ptr, g_soft_ptr, g_hard_ptr,
    div_ptr, ent_ptr, nll_ptr, state_ptr,
    V, inv_t, beta, one_m_beta, log_1mb, log_b, ignore_index,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, HARD: tl.constexpr, HARD_GRAD: tl.constexpr, GRAD: tl.constexpr,
    STATE_OUT: tl.constexpr, STATE_IN: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # HARD: labels given (the NLL is computed); HARD_GRAD: the NLL has a weight in the gradient (g_hard).
    # one_m_beta = 1 - beta from the launcher's double (a float argument is fp32 on a GPU: 1 - fp32(beta) is 0 at a
    # beta within its rounding of 1), as the C++ kernel forms it
    r = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + r * s_stride
    zt_row = zt_ptr + r * t_stride
    cols = tl.arange(0, BLOCK_V)
    scored = (tl.load(mask_ptr + r) != 0.0) if HAS_MASK else True
    end = tl.where(scored, V, 0)

    st_row = state_ptr + r * STATE_COLS
    if STATE_IN:  # sweeps 1-2 ran in the call that wrote the state
        m_s = tl.load(st_row + 0)
        log_ss = tl.load(st_row + 1)
        m_t = tl.load(st_row + 2)
        log_st = tl.load(st_row + 3)
        m_1 = tl.load(st_row + 4)
        log_s1 = tl.load(st_row + 5)
        K = tl.load(st_row + 6)
        inv_ns = tl.load(st_row + 7)
        inv_nt = tl.load(st_row + 8)
        cos_s = tl.load(st_row + 9)
        if HARD:
            y = tl.load(labels_ptr + r)
            labelled = scored & (y != ignore_index)
            valid = (y >= 0) & (y < V)
    else:
        m_s = tl.full((), NEG_INF, tl.float32)
        s_s = tl.zeros((), tl.float32)
        t_s = tl.zeros((), tl.float32)
        m_t = tl.full((), NEG_INF, tl.float32)
        s_t = tl.zeros((), tl.float32)
        m_1 = tl.full((), NEG_INF, tl.float32)
        s_1 = tl.zeros((), tl.float32)
        for start in range(0, end, BLOCK_V):
            c = start + cols
            z = tl.load(zs_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
            zt = tl.load(zt_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
            m_s, s_s, t_s, _q = add_block(m_s, s_s, t_s, s_s, z * inv_t, 0, True, False)
            m_t, s_t, _t, _q = add_block(m_t, s_t, s_t, s_t, zt * inv_t, 0, False, False)
            if HARD:
                m_1, s_1, _t, _q = add_block(m_1, s_1, s_1, s_1, z, 0, False, False)
        log_ss = tl.log(s_s)
        log_st = tl.log(s_t)
        ent = log_ss - t_s / s_s

        d_acc = tl.zeros([BLOCK_V], tl.float32)
        k_acc = tl.zeros([BLOCK_V], tl.float32)
        t_acc = tl.zeros([BLOCK_V], tl.float32)  # cosine: |x_t|^2 (d_acc: x_s . x_t, k_acc: |x_s|^2)
        for start in range(0, end, BLOCK_V):
            c = start + cols
            inside = c < V
            xs = tl.load(zs_row + c, mask=inside, other=0.0).to(tl.float32) * inv_t
            xt = tl.load(zt_row + c, mask=inside, other=0.0).to(tl.float32) * inv_t
            if MODE == 3:
                d_acc += xs * xt
                k_acc += xs * xs
                t_acc += xt * xt
            else:
                lps, lpt, ps, pt, lm = _column(xs, xt, m_s, log_ss, m_t, log_st, log_1mb, log_b, MODE)
                # KL's column p (lp - lq) is +inf where q has no mass and p has some (not ~1e30 p from the floor);
                # K, which the gradient reads, keeps the floored value
                if MODE == 0:
                    d = tl.where((pt > 0.0) & (lps <= FLOOR), float("inf"), pt * (lpt - lps))
                    k = tl.zeros([BLOCK_V], tl.float32)
                elif MODE == 1:
                    k = ps * (lps - lpt)
                    d = tl.where((ps > 0.0) & (lpt <= FLOOR), float("inf"), k)
                elif MODE == 4:
                    d = 0.5 * tl.abs(ps - pt)
                    k = ps * _sign(ps - pt)
                else:
                    k = ps * (lps - lm)
                    d = beta * (pt * (lpt - lm)) + one_m_beta * k
                d_acc += tl.where(inside, d, 0.0)
                k_acc += tl.where(inside, k, 0.0)
        if MODE == 3:
            n_s = tl.sqrt(tl.sum(k_acc, 0))
            n_t = tl.sqrt(tl.sum(t_acc, 0))
            inv_ns = 1.0 / tl.where(n_s > 1e-12, n_s, 1e-12)
            inv_nt = 1.0 / tl.where(n_t > 1e-12, n_t, 1e-12)
            cos = tl.sum(d_acc, 0) * inv_ns * inv_nt
            cos_s = tl.where(n_s <= 1e-12, 0.0, cos)  # a NaN norm keeps the NaN
            D = 1.0 - cos
            K = tl.zeros((), tl.float32)
        else:
            D = tl.sum(d_acc, 0)
            K = tl.sum(k_acc, 0)
            inv_ns = tl.zeros((), tl.float32)
            inv_nt = tl.zeros((), tl.float32)
            cos_s = tl.zeros((), tl.float32)
        tl.store(div_ptr + r, tl.where(scored, D, 0.0))
        tl.store(ent_ptr + r, tl.where(scored, ent, 0.0))

        log_s1 = tl.zeros((), tl.float32)
        if HARD:
            y = tl.load(labels_ptr + r)
            labelled = scored & (y != ignore_index)
            valid = (y >= 0) & (y < V)
            log_s1 = tl.log(s_1)
            z_y = tl.load(zs_row + tl.where(valid & labelled, y, 0)).to(tl.float32)
            nll = tl.where(valid, log_s1 - (z_y - m_1), float("nan"))
            tl.store(nll_ptr + r, tl.where(labelled, nll, 0.0))
        if STATE_OUT:
            tl.store(st_row + 0, m_s)
            tl.store(st_row + 1, log_ss)
            tl.store(st_row + 2, m_t)
            tl.store(st_row + 3, log_st)
            tl.store(st_row + 4, m_1)
            tl.store(st_row + 5, log_s1)
            tl.store(st_row + 6, K)
            tl.store(st_row + 7, inv_ns)
            tl.store(st_row + 8, inv_nt)
            tl.store(st_row + 9, cos_s)
    if GRAD:
        g_soft = tl.load(g_soft_ptr + r) * inv_t
        g_hard = 0.0
        if HARD_GRAD:
            g_hard = tl.where(labelled, tl.load(g_hard_ptr + r), 0.0)
            g_hard = tl.where(labelled & ~valid & (g_hard != 0.0), float("nan"), g_hard)  # a weighted invalid label
        for start in range(0, V, BLOCK_V):
            c = start + cols
            inside = c < V
            read = c < end
            z = tl.load(zs_row + c, mask=read, other=0.0).to(tl.float32)
            xt = tl.load(zt_row + c, mask=read, other=0.0).to(tl.float32) * inv_t
            if MODE == 3:
                g = inv_ns * (cos_s * (z * inv_t) * inv_ns - xt * inv_nt)
            else:
                lps, lpt, ps, pt, lm = _column(z * inv_t, xt, m_s, log_ss, m_t, log_st, log_1mb, log_b, MODE)
                if MODE == 0:
                    g = ps - pt
                elif MODE == 1:
                    g = ps * (lps - lpt - K)
                elif MODE == 4:
                    g = 0.5 * ps * (_sign(ps - pt) - K)
                else:
                    g = one_m_beta * ps * (lps - lm - K)
            g = g_soft * g
            if HARD_GRAD:
                p1 = exp(_floor((z - m_1) - log_s1))
                g += g_hard * (p1 - tl.where(c == y, 1.0, 0.0))
            g = tl.where(read, g, 0.0)
            tl.store(zs_row + c, g.to(zs_ptr.dtype.element_ty), mask=inside)


def _block(V):
    return min(triton.next_power_of_2(max(V, 1)), 2048)


def divergence_rows(zs, zt, inv_t, mode, beta, mask, labels, ignore_index, g_soft, g_hard, div, ent, nll, state=None,
                    state_in=False):
    """zs, zt: [n, V] (last dim contiguous); zs is overwritten with the gradient when ``g_soft`` is given.
    ``mode``: 0 forward KL, 1 reverse KL, 2 the generalized JSD at ``beta``, 3 the cosine distance, 4 the total
    variation distance.
    ``mask``, ``labels``, ``g_hard``, ``nll``: None to skip. ``state`` (``[n, STATE_COLS]`` fp32): written without
    ``g_soft``; read by a gradient call with ``state_in`` (which then writes no ``div``, ``ent`` or ``nll``)."""
    n, V = zs.shape
    if n == 0:
        return
    block = _block(V)
    log_1mb = math.log(1 - beta) if mode == 2 else 0.0
    log_b = math.log(beta) if mode == 2 else 0.0
    dummy = div
    divergence_rows_kernel[(n,)](
        zs, zs.stride(0), zt, zt.stride(0), mask if mask is not None else dummy,
        labels if labels is not None else dummy, g_soft if g_soft is not None else dummy,
        g_hard if g_hard is not None else dummy, div, ent, nll if nll is not None else dummy,
        state if state is not None else dummy,
        V, inv_t, beta, 1.0 - beta, log_1mb, log_b, ignore_index,
        MODE=mode, HAS_MASK=mask is not None, HARD=labels is not None,
        HARD_GRAD=labels is not None and g_hard is not None, GRAD=g_soft is not None,
        STATE_OUT=state is not None and g_soft is None, STATE_IN=state is not None and state_in,
        BLOCK_V=block, num_warps=8 if block >= 1024 else 4,
    )
