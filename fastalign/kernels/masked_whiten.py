"""``masked_whiten`` in Triton (docs/math.md#advantages): x whitened over a mask of weights m, float64 sums, in three
launches of the same grid. Program p owns one span of tokens (``span``, a multiple of BLOCK; int64 offsets) and
each pass adds its own span; every program of a later pass adds the earlier pass's per-span sums itself, in one
fixed order (the same total in every program: no extra launch, no host sync). With valid_t = (m_t != 0):

    SUMS:     sums_p = (sum m, sum_valid m x)                                over span p
    SQUARES:  N, mean = sum_p sums_p[1] / max'(N);  sums_p[2] = sum_valid m (x - mean)^2
    SCALE:    S = sum_p sums_p[2];  inv = rsqrt(S / (N - 1) + eps) (NaN where N <= 1), or rsqrt(max(S / max'(N),
              eps)) biased;  out_t = valid_t ? (x_t - mean) inv m_t : 0          (x's dtype)

max'(N) is N, or 1 where N = 0 (every token masked, and no output reads the statistics). The spans depend on the
token count alone and the sums' order on the launch configuration, so the results are the same run to run.
"""
import triton
import triton.language as tl

BLOCK = 1024  # tokens a step
MAX_SPANS = 1024  # programs at most: every program of a later pass reads MAX_SPANS x 3 float64 sums
SUMS, SQUARES, SCALE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # the passes


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """v in ``dtype``, through fp32 where either is narrower: exact widening (the interpreter's own bf16 -> fp64 cast
    is wrong), and fp64 rounded to bf16 / fp16 as torch rounds it."""
    if v.dtype.primitive_bitwidth < 32 or dtype.primitive_bitwidth < 32:
        v = v.to(tl.float32)
    return v.to(dtype)


@triton.jit
def _mean(sums_ptr, spans, MAX_SPANS: tl.constexpr):
    """(N, max'(N), mean) from the sums pass."""
    N = _total(sums_ptr, 0, spans, MAX_SPANS)
    n_or_one = tl.where(N > 0.0, N, 1.0)
    return N, n_or_one, _total(sums_ptr, 1, spans, MAX_SPANS) / n_or_one


@triton.jit
def _inv_std(sums_ptr, eps_ptr, spans, UNBIASED: tl.constexpr, MAX_SPANS: tl.constexpr):
    """inv, and the mean, from the sums and squares passes."""
    N, n_or_one, mean = _mean(sums_ptr, spans, MAX_SPANS)
    S = _total(sums_ptr, 2, spans, MAX_SPANS)
    eps = tl.load(eps_ptr)  # float64, as given (a float argument would be rounded to fp32)
    if UNBIASED:  # verl: the unbiased variance plus eps
        inv = 1.0 / tl.sqrt(S / tl.where(N > 1.0, N - 1.0, float("nan")) + eps)
    else:  # OpenRLHF: the biased variance, floored at eps (NaN stays NaN)
        var = S / n_or_one
        inv = 1.0 / tl.sqrt(tl.where(var < eps, eps, var))
    return mean, inv


@triton.jit
def _total(sums_ptr, col: tl.constexpr, spans, MAX_SPANS: tl.constexpr):
    """sum_p sums_p[col] over the spans, in one fixed order."""
    p = tl.arange(0, MAX_SPANS)
    return tl.sum(tl.load(sums_ptr + 3 * p + col, mask=p < spans, other=0.0), axis=0)


@triton.jit
def masked_whiten_kernel(x_ptr, m_ptr, sums_ptr, eps_ptr, out_ptr, n, span, spans, PASS: tl.constexpr,
                         UNBIASED: tl.constexpr, BLOCK: tl.constexpr, MAX_SPANS: tl.constexpr):
    pid = tl.program_id(0)
    t0 = pid.to(tl.int64) * span
    if PASS == SQUARES:
        _, _, mean = _mean(sums_ptr, spans, MAX_SPANS)
    elif PASS == SCALE:
        mean, inv = _inv_std(sums_ptr, eps_ptr, spans, UNBIASED, MAX_SPANS)
    a = tl.zeros([BLOCK], dtype=tl.float64)
    b = tl.zeros([BLOCK], dtype=tl.float64)
    for k in range(0, span, BLOCK):
        offs = t0 + k + tl.arange(0, BLOCK)
        live = offs < n
        w = _cast(tl.load(m_ptr + offs, mask=live, other=0), tl.float64)
        x = _cast(tl.load(x_ptr + offs, mask=live, other=0), tl.float64)
        valid = w != 0.0  # a masked x (NaN, inf) never reaches a sum or an output
        if PASS == SUMS:
            a += w
            b += tl.where(valid, w * x, 0.0)
        elif PASS == SQUARES:
            d = x - mean
            a += tl.where(valid, w * (d * d), 0.0)
        else:
            y = tl.where(valid, (x - mean) * inv * w, 0.0)
            tl.store(out_ptr + offs, _cast(y, out_ptr.dtype.element_ty), mask=live)
    if PASS == SUMS:
        tl.store(sums_ptr + 3 * pid, tl.sum(a, axis=0))
        tl.store(sums_ptr + 3 * pid + 1, tl.sum(b, axis=0))
    elif PASS == SQUARES:
        tl.store(sums_ptr + 3 * pid + 2, tl.sum(a, axis=0))


def spans_of(n: int) -> tuple[int, int]:
    """(span, spans): at most MAX_SPANS spans of a whole number of blocks covering n tokens."""
    blocks = triton.cdiv(max(n, 1), BLOCK)
    span = triton.cdiv(blocks, MAX_SPANS) * BLOCK
    return span, triton.cdiv(max(n, 1), span)


def masked_whiten(x, mask, out, eps: float, unbiased: bool):
    """Launch on flat contiguous ``x`` (any float dtype) and ``mask`` (any dtype; one device): the result into
    ``out`` (x's dtype)."""
    import torch

    span, spans = spans_of(x.numel())
    sums = torch.empty(3 * spans, dtype=torch.float64, device=x.device)
    eps_t = torch.full((1,), eps, dtype=torch.float64, device=x.device)
    for p in (SUMS, SQUARES, SCALE):  # UNBIASED is read by the scale pass only: the others compile once
        masked_whiten_kernel[(spans,)](x, mask, sums, eps_t, out, x.numel(), span, spans, PASS=p.value,
                                       UNBIASED=p.value == SCALE.value and bool(unbiased), BLOCK=BLOCK,
                                       MAX_SPANS=MAX_SPANS)


def aot_cases(dtype):
    """The three passes (the scale pass unbiased and biased) with a bool mask, and with a mask of x's dtype (as the
    advantage estimators pass it), at a realistic batch of tokens (fastalign.aot compiles them ahead of time)."""
    import torch

    n = 1024 * 4096
    x = torch.empty(n, dtype=dtype, device="meta")
    sums = torch.empty(3 * MAX_SPANS, dtype=torch.float64, device="meta")
    eps = torch.empty(1, dtype=torch.float64, device="meta")
    span, spans = spans_of(n)
    for masks, mask_dtype in (("", torch.bool), ("+x_mask", dtype)):
        mask = torch.empty(n, dtype=mask_dtype, device="meta")
        for name, p, unbiased in (("sums", SUMS, False), ("squares", SQUARES, False), ("scale", SCALE, True),
                                  ("scale+biased", SCALE, False)):
            yield name + masks, lambda p=p, unbiased=unbiased, mask=mask: masked_whiten_kernel[(spans,)](
                x, mask, sums, eps, x, n, span, spans, PASS=p.value, UNBIASED=unbiased, BLOCK=BLOCK,
                MAX_SPANS=MAX_SPANS)
