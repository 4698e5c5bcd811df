"""Divergences between given distributions, element by element (docs/math.md#elementwise-divergence).

One program per row of input x and target y (any kernel dtype, read as fp32), no softmax: x and y are
log-probabilities or probabilities as given, and the derivative is the partial one in x_j alone. Per element
(p = e^y, q = e^x; a term whose weight is 0 adds 0, so a zero probability adds nothing even where its log is -inf):

    MODE 0 forward KL (jsd, beta 0):  f = p (y - x)                                     df = -p
    MODE 1 reverse KL (jsd, beta 1):  f = q (x - y)                                     df = q (x - y) + q
    MODE 2 generalized JSD,           f = beta p (y - lm) + (1 - beta) q (x - lm)       df = (1 - beta) q (x - lm)
           lm = log(beta p + (1 - beta) q)
    MODE 3 KL, probability target:    f = y (log max(y, eps) - x)                       df = -y
    MODE 4 KL, log-probability target: f = p (y - x)   (kl_div's terms, no zero rule)   df = -p
    MODE 5 total variation, x, y probabilities: f = |x - y| / 2                         df = sign(x - y) / 2

Forward: the row's sum of f (fp32, one running sum per lane, reduced once) or, with ELEMENTS, every f (fp32).
GRAD: g * df written in the input's dtype, g per row or (G_ELEMENTS) per element. A row whose mask is 0 gives 0
(its elements and gradient 0) without reading its inputs. A NaN element makes its f, the row's sum and its df NaN.
"""
import math

import triton
import triton.language as tl

from fastalign.kernels.softmax_math import NEG_INF, exp


@triton.jit
def _weighted(w, d):
    """w d, 0 where the weight w is 0 (0 log 0 = 0; a NaN weight stays NaN)."""
    return tl.where(w == 0.0, 0.0, w * d)


@triton.jit
def _terms(x, y, log_b, log_1mb, eps, MODE: tl.constexpr):
    """(f, df) of a tile, fp32."""
    if MODE == 0:
        p = exp(y)
        f = _weighted(p, y - x)
        df = -p
    elif MODE == 1:
        q = exp(x)
        f = _weighted(q, x - y)
        df = _weighted(q, x - y + 1.0)
    elif MODE == 2:
        # a = y + log beta, b = x + log(1 - beta): e^a = beta p, e^b = (1 - beta) q, lm = log(e^a + e^b) from the
        # larger, hi, and r = e^(lo - hi): lm = hi + log(1 + r), and the two weights are e^hi and e^hi r (two exps)
        a = y + log_b
        b = x + log_1mb
        a_hi = a > b
        hi = tl.where(a_hi, a, b)
        none = hi == NEG_INF  # p = q = 0
        r = tl.where(none, 0.0, exp(tl.where(a_hi, b, a) - hi))
        e_hi = exp(hi)
        lm = tl.where(none, NEG_INF, hi + tl.log(1.0 + r))
        df = _weighted(tl.where(a_hi, e_hi * r, e_hi), x - lm)
        f = _weighted(tl.where(a_hi, e_hi, e_hi * r), y - lm) + df
    elif MODE == 3:
        f = y * (tl.log(tl.maximum(y, eps)) - x)
        df = -y
    elif MODE == 4:
        p = exp(y)
        f = p * (y - x)
        df = -p
    else:
        d = x - y
        f = 0.5 * tl.abs(d)
        df = tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, d * 0.0))  # 0 at d = 0, NaN for NaN
    return f, df


@triton.jit
def elementwise_divergence_kernel(
    x_ptr, x_stride, y_ptr, y_stride, mask_ptr, rows_ptr, elem_ptr, elem_stride, g_ptr, g_stride, grad_ptr,
    grad_stride, V, log_b, log_1mb, eps,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, ELEMENTS: tl.constexpr, GRAD: tl.constexpr,
    G_ELEMENTS: tl.constexpr, READS_X: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # READS_X: False for the KL's gradient sweep (its derivative does not depend on x)
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    keep = (tl.load(mask_ptr + r) != 0.0) if HAS_MASK else True
    end = tl.where(keep, V, 0)  # a row whose mask is 0 reads nothing
    x_row = x_ptr + r * x_stride
    y_row = y_ptr + r * y_stride
    if not G_ELEMENTS:
        g = tl.load(g_ptr + r) if GRAD else 0.0
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        inside = c < V
        read = c < end
        y = tl.load(y_row + c, mask=read, other=0.0).to(tl.float32)
        x = tl.load(x_row + c, mask=read, other=0.0).to(tl.float32) if READS_X else y
        f, df = _terms(x, y, log_b, log_1mb, eps, MODE)
        if GRAD:
            if G_ELEMENTS:
                g = tl.load(g_ptr + r * g_stride + c, mask=read, other=0.0)
            tl.store(grad_ptr + r * grad_stride + c, tl.where(read, g * df, 0.0).to(grad_ptr.dtype.element_ty),
                     mask=inside)
        elif ELEMENTS:
            tl.store(elem_ptr + r * elem_stride + c, tl.where(read, f, 0.0), mask=inside)
        else:
            acc += tl.where(read, f, 0.0)
    if not GRAD and not ELEMENTS:
        tl.store(rows_ptr + r, tl.sum(acc, axis=0))


def _block(V):
    return min(triton.next_power_of_2(max(V, 1)), 4096)


def elementwise_divergence(x, y, mode, log_b, log_1mb, eps, mask, rows, elements, g, grad):
    """x, y: [n, V] rows (last dim contiguous); ``log_b``, ``log_1mb``: log beta and log(1 - beta) (the JSD's),
    ``eps`` (the KL's). Forward: ``rows`` ([n] fp32) or ``elements`` ([n, V] fp32);
    with ``g`` ([n] or [n, V] fp32) the gradient ``g * df`` into ``grad`` (x's shape and dtype). ``mask``:
    None, or [n] fp32 (0: the row gives 0)."""
    n, V = x.shape
    if n == 0 or V == 0:
        return
    block = _block(V)
    dummy = y
    elements_out = elements if elements is not None else dummy
    g_elements = g is not None and g.dim() == 2
    elementwise_divergence_kernel[(n,)](
        x, x.stride(0), y, y.stride(0), mask if mask is not None else dummy, rows if rows is not None else dummy,
        elements_out, elements_out.stride(0), g if g is not None else dummy, g.stride(0) if g_elements else 0,
        grad if grad is not None else dummy, grad.stride(0) if grad is not None else 0,
        V, log_b, log_1mb, eps,
        MODE=mode, HAS_MASK=mask is not None, ELEMENTS=elements is not None, GRAD=g is not None,
        G_ELEMENTS=g_elements, READS_X=g is None or mode not in (3, 4), BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )


def aot_cases(dtype):
    """Every mode, forward (row sums with a mask, elements) and gradient (per-row and per-element weights), at a
    GPU block of rows and a realistic vocabulary (fastalign.aot compiles them ahead of time)."""
    import torch

    rows, vocab = 2048, 151936
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    x, y = meta(rows, vocab, dtype=dtype), meta(rows, vocab, dtype=dtype)
    coefs = (math.log(0.5), math.log(0.5), 1e-10)  # log beta, log(1 - beta), eps
    for mode, name in enumerate(("fkl", "rkl", "jsd", "kl", "kl_log_target", "tvd")):
        yield name, lambda mode=mode: elementwise_divergence(x, y, mode, *coefs, meta(rows), meta(rows), None, None,
                                                             None)
        yield name + "+elements", lambda mode=mode: elementwise_divergence(x, y, mode, *coefs, None, None,
                                                                          meta(rows, vocab), None, None)
        for g_shape in ((rows,), (rows, vocab)):
            kind = "+grad" + ("+g_elements" if len(g_shape) == 2 else "") + "+mask"
            yield name + kind, lambda mode=mode, g_shape=g_shape: elementwise_divergence(
                x, y, mode, *coefs, meta(rows), None, None, meta(*g_shape), meta(rows, vocab, dtype=dtype))
