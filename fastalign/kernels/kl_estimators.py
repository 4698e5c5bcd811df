"""The per-token KL estimators (docs/math.md#kl-estimators), value and derivative in lp, fp32: the table of
``csrc/cpu/kl_estimators.h`` in Triton, for the fused policy loss (``policy_loss.py``) and ``kl_penalty``
(``kl_penalty.py``). With d = lp - ref and x = -d:

    k1   d                                           d/dlp: 1
    abs  |d|                                                sign(d) (0 at d = 0 and for NaN)
    k2   d^2 / 2                                            d
    k3   clamp(k3(clamp(x, -20, 20)), -10, 10)               -expm1(x), 0 where a clamp binds or x is NaN
         (KL_CLAMP off: no clamp, and every k3 passes its gradient)
    NAME+ (KL_STRAIGHT): NAME's value, k2's derivative d (0 at an infinite d)

The codes K1..K3 are ``fastalign.ops.kl_penalty.KL_CODES``.
"""
import triton
import triton.language as tl

K1 = tl.constexpr(0)
KABS = tl.constexpr(1)
K2 = tl.constexpr(2)
K3 = tl.constexpr(3)


@triton.jit
def clamp(x, lo, hi):
    """x clamped to [lo, hi] as torch.clamp (hi where lo > hi), keeping NaN (tl.minimum / tl.maximum would drop
    it)."""
    above_lo = tl.where(x < lo, lo, x)
    return tl.where(above_lo > hi, hi, above_lo)


@triton.jit
def k3(x):
    """(exp(x) - x - 1, expm1(x)) without the cancellation of exp(x) against 1 + x near 0: for |x| < 0.5 the
    series x^2 (1/2! + x/3! + ... + x^7/9!), elsewhere (+-inf and NaN included) from exp(x) (csrc/cpu/vec_math.h)."""
    e = tl.exp(x)
    p = x * 2.7557319e-6 + 2.4801587e-5
    p = p * x + 1.9841270e-4
    p = p * x + 1.3888889e-3
    p = p * x + 8.3333333e-3
    p = p * x + 4.1666667e-2
    p = p * x + 1.6666667e-1
    p = p * x + 0.5
    s = x * x * p
    small = (x > -0.5) & (x < 0.5)
    return tl.where(small, s, e - x - 1.0), tl.where(small, x + s, e - 1.0)


@triton.jit
def kl_term(d, KL_TYPE: tl.constexpr, KL_CLAMP: tl.constexpr, KL_STRAIGHT: tl.constexpr):
    """The KL estimator of d = lp - ref and its d/d(lp): k1 d, abs |d|, k2 d^2 / 2, k3 exp(-d) + d - 1
    (KL_CLAMP: of clamp(-d, -20, 20), then clamped to [-10, 10]; no gradient where a clamp binds);
    KL_STRAIGHT: k2's gradient d, 0 at an infinite d (kl_penalty's NAME+)."""
    if KL_TYPE == K1:
        kv = d
        dkl = tl.zeros_like(d) + 1.0
    elif KL_TYPE == KABS:
        kv = tl.abs(d)
        dkl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif KL_TYPE == K2:
        kv = 0.5 * d * d
        dkl = d
    else:
        x = -d
        if KL_CLAMP:
            k3_v, em1 = k3(clamp(x, -20.0, 20.0))
            kv = clamp(k3_v, -10.0, 10.0)
            live = (x >= -20.0) & (x <= 20.0) & (k3_v >= -10.0) & (k3_v <= 10.0)
            dkl = tl.where(live, -em1, 0.0)
        else:
            kv, em1 = k3(x)
            dkl = -em1
    if KL_STRAIGHT:
        dkl = tl.where((d == float("inf")) | (d == -float("inf")), 0.0, d)
    return kv, dkl
