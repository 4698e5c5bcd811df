"""Softmax statistics written once for every Triton kernel (docs/math.md#token-statistics).

A running state over some logits x (already divided by the temperature) is
(m, s, t, q), relative to its max m:

    s = sum e^{x - m},   t = sum e^{x - m} (x - m),   q = sum e^{2 (x - m)}

``rescale`` re-expresses a state relative to a larger max M (a = e^{m - M}):

    s' = a s,   t' = a (t + (m - M) s),   q' = a^2 q

``add_block`` folds a block of logits into a state, ``merge`` joins two states
(in any order: the result is symmetric), and ``finish`` turns a state into

    lse = m + log s,   logprob = (x_y - m) - log s,   H = log s - t / s,   sum p^2 = q / s^2

with x_y - m formed first, so the log-prob error is the fp32 rounding of the
log-prob itself, not of |max| (a row max of 1e4 or a constant row of 1e30
loses nothing). ``dlogits`` is the backward, with log p = (x - lse) - log c:

    dx_j = g_lp (1[j = y] - p_j) - g_H p_j (log p_j + H) + 2 g_P p_j (p_j - sum p^2)

The saved fp32 lse is off by its rounding, up to ulp(lse) / 2 (5e-4 at 1e4), which
would scale every p of the row by e^{-rounding}. A backward that sees whole rows forms

    log c = log sum_j e^{x_j - lse}

(the rounding itself, accurate since the sum is ~1); subtracted from the exact
difference x - lse it gives p to fp32 rounding again (token_stats; the fused linear
backward sees vocabulary blocks only and passes 0). It is never folded into lse,
which would round back onto the same fp32 grid.

Edge values:

* The running max starts at -inf. Equal maxima (two -inf too) rescale by a = 1
  without forming -inf - -inf, other differences are clamped at -1e30 (so
  -inf * 0 never occurs: a state that has seen only -inf logits has
  s = t = q = 0 and contributes nothing), and x - M is taken against
  max(M, -FLT_MAX), so a -inf logit gives e = 0 even before any finite one.
* -inf logits give e = 0 and no 0 * inf (t clamps x - M at -1e30); a row of
  only -inf logits gives s = 0 and a NaN log-prob, like log_softmax.
* NaN propagates. Whether ``tl.max`` / ``tl.maximum`` return a NaN operand is
  left to the implementation (compiled code drops it, some interpreters keep
  it), and nothing here depends on it: a NaN logit x gives e^{x - M} = NaN
  either way, and NaN in s, t or q is never clamped away, so a row with a NaN
  logit (or a NaN weight row, or NaN gradient inputs) ends as NaN, as on the
  C++ backend.
"""
import os

import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
#: Compiled kernels take e^x as one ex2.approx.ftz (results below 2^-126 flush to 0, which no
#: sum here can see); the interpreter, which runs no PTX, takes tl.exp.
FAST_EXP: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def exp(x):
    """e^x in fp32: ex2.approx.ftz(x log2 e) when compiled."""
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def rescale(m, s, t, q, M):
    """The state (m, s, t, q) relative to a max M >= m (broadcastable)."""
    # m = M, also both -inf: a = 1 (no -inf - -inf); an empty state under a finite M: a = 0, no inf * 0
    dm = tl.where(m == M, 0.0, tl.maximum(m - M, -1e30))
    a = exp(dm)
    return a * s, a * (t + dm * s), a * a * q


@triton.jit
def merge(m_a, s_a, t_a, q_a, m_b, s_b, t_b, q_b):
    """One state from two states over disjoint logits."""
    M = tl.maximum(m_a, m_b)
    sa, ta, qa = rescale(m_a, s_a, t_a, q_a, M)
    sb, tb, qb = rescale(m_b, s_b, t_b, q_b, M)
    return M, sa + sb, ta + tb, qa + qb


@triton.jit
def add_block(m, s, t, q, x, AXIS: tl.constexpr, WANT_T: tl.constexpr, WANT_Q: tl.constexpr):
    """Fold the logits x into the state, reducing x along AXIS (the state has x's shape without AXIS).

    Only the within-block max and sums reduce along AXIS; laid out so that AXIS is
    held by one thread, this is register arithmetic with no cross-thread traffic."""
    M = tl.maximum(m, tl.max(x, AXIS))
    s, t, q = rescale(m, s, t, q, M)
    d = x - tl.expand_dims(tl.maximum(M, -3.4028234663852886e38), AXIS)  # exact for x near M; -inf x: -inf
    e = exp(d)
    s += tl.sum(e, AXIS)
    if WANT_T:
        t += tl.sum(e * tl.maximum(d, -1e30), AXIS)  # -inf logits: e = 0 and no 0 * inf
    if WANT_Q:
        q += tl.sum(e * e, AXIS)
    return M, s, t, q


@triton.jit
def finish(m, s, t, q, x_y):
    """(lse, logprob, entropy, sum p^2) of a state; x_y is the label's logit (/ T)."""
    log_s = tl.log(s)
    return m + log_s, (x_y - m) - log_s, log_s - t / s, q / (s * s)


@triton.jit
def lse_rounding(m, s, lse, keep, renormalise_above):
    """log c = log sum_j e^{x_j - lse} = (m - lse) + log s for the state (m, s) whose lse was just rounded, at the
    rows ``keep`` with renormalise_above <= |lse| < inf, else 0: the rounding backward removes from log p
    (m - lse is exact there: Sterbenz, m >= lse - log V). A row of no mass (lse = -inf) has none."""
    far = keep & (tl.abs(lse) >= renormalise_above) & (tl.abs(lse) < float("inf"))
    return tl.where(far, (m - lse) + tl.log(s), 0.0)


@triton.jit
def dlogits(x, lse, log_c, is_label, g_lp, g_ent, ent, g_sp2, sp2,
            HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_SP2: tl.constexpr):
    """d(loss)/dx for logits x (/ T) of rows with the given lse, log c and statistics (all broadcastable)."""
    logp = (x - lse) - log_c
    p = exp(logp)
    dx = tl.zeros(x.shape, tl.float32)
    if HAS_G_LP:
        dx += g_lp * (tl.where(is_label, 1.0, 0.0) - p)
    if HAS_G_ENT:
        dx -= g_ent * p * (tl.maximum(logp, -1e30) + ent)  # -inf logits: p = 0, no 0 * inf
    if HAS_G_SP2:
        dx += 2.0 * g_sp2 * p * (p - sp2)
    return dx
