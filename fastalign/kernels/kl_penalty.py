"""``kl_penalty`` in Triton: the per-token KL estimate (``kl_estimators.kl_term``) in one pass, and its gradient
in another. One program per BLOCK elements (int64 offsets):

    forward:   out_t = KL(lp_t - ref_t)                   (fp32)
    backward:  grad_t = g_t dKL/dlp_t                     (lp's dtype; G_SCALAR: one g for every element)
"""
import triton
import triton.language as tl

from fastalign.kernels.kl_estimators import kl_term

BLOCK = 1024


@triton.jit
def kl_penalty_kernel(lp_ptr, ref_ptr, out_ptr, g_ptr, grad_ptr, n, KL_TYPE: tl.constexpr, KL_CLAMP: tl.constexpr,
                      KL_STRAIGHT: tl.constexpr, BACKWARD: tl.constexpr, G_SCALAR: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    lp = tl.load(lp_ptr + offs, mask=live, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=live, other=0.0).to(tl.float32)
    kv, dkl = kl_term(lp - ref, KL_TYPE, KL_CLAMP, KL_STRAIGHT)
    if BACKWARD:
        if G_SCALAR:
            g = tl.load(g_ptr)
        else:
            g = tl.load(g_ptr + offs, mask=live, other=0.0)
        tl.store(grad_ptr + offs, (g * dkl).to(grad_ptr.dtype.element_ty), mask=live)
    else:
        tl.store(out_ptr + offs, kv, mask=live)


def kl_penalty(lp, ref, kl_type: int, straight: bool, kl_clamp: bool, out=None, g=None, g_scalar=False, grad=None):
    """Launch on flat contiguous ``lp`` and ``ref`` (one device): the values into ``out`` (fp32), or with ``g``
    (fp32: every element's, or with ``g_scalar`` one for all) the gradient into ``grad`` (lp's dtype)."""
    n = lp.numel()
    backward = g is not None
    kl_penalty_kernel[(triton.cdiv(n, BLOCK),)](
        lp, ref, out if out is not None else grad, g if backward else lp, grad if backward else out, n,
        KL_TYPE=kl_type, KL_CLAMP=bool(kl_clamp), KL_STRAIGHT=bool(straight), BACKWARD=backward,
        G_SCALAR=bool(g_scalar), BLOCK=BLOCK)


def aot_cases(dtype):
    """k3 (clamped and not) and a straight-through k2, forward and gradient (per-element and one upstream
    gradient), at a realistic batch of tokens (fastalign.aot compiles them ahead of time)."""
    import torch

    n = 1024 * 4096
    meta = lambda dt=torch.float32: torch.empty(n, dtype=dt, device="meta")  # noqa: E731
    one = torch.empty(1, dtype=torch.float32, device="meta")
    lp, ref = meta(dtype), meta(dtype)
    for name, kl_type, straight, clamp in (("k3", 3, False, True), ("k3+unclamped", 3, False, False),
                                           ("k2+straight", 2, True, True)):
        yield name, lambda kl_type=kl_type, straight=straight, clamp=clamp: kl_penalty(lp, ref, kl_type, straight,
                                                                                       clamp, out=meta())
        yield name + "+grad", lambda kl_type=kl_type, straight=straight, clamp=clamp: kl_penalty(
            lp, ref, kl_type, straight, clamp, g=meta(), grad=meta(dtype))
    yield "k3+grad+g_scalar", lambda: kl_penalty(lp, ref, 3, False, True, g=one, g_scalar=True, grad=meta(dtype))
