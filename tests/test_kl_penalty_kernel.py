"""``kl_penalty`` on eager CPU tensors runs the C++ kernel for k2, k3 and the straight-through estimators
(csrc/cpu/kl_penalty.cpp, the estimator table the fused policy loop uses); elsewhere, and for k1 and abs, its torch
ops run. Both against the float64 reference, and against each other, on
every estimator, option and kernel dtype, values and gradients, non-finite inputs and clamp boundaries included."""
import itertools
import math
import os

import pytest
import torch

import fastalign as fa
from fastalign import _backend
from fastalign.ops import kl_penalty as ops
from fastalign.reference import policy as R

KINDS = [k + s for k in ("k1", "abs", "k2", "k3") for s in ("", "+")]
EDGES = [0.0, 1e-9, -1e-9, 1e-30, 0.49, -0.49, 0.5, -0.5, 19.9, -19.9, 20.0, -20.0, 20.1, -20.1, 2.39, -2.39, 30.0,
         -30.0, 1e20, -1e20, math.nan, math.inf, -math.inf]  # 1e20: k2 = d^2 / 2 overflows fp32


def _inputs(dtype, ref_dtype, n=2000, seed=0):
    """Random log-probs and references, then one token per edge value of x = ref - lp, and an infinite ref."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.cat([torch.randn(n, generator=g) * 3 - 2, torch.full((len(EDGES) + 1,), -1.0)])
    ref = lp + torch.cat([torch.randn(n, generator=g) * 0.7, torch.tensor(EDGES + [0.0])])
    ref[-1] = -math.inf
    return lp.to(dtype), ref.to(ref_dtype)


def _value_and_grad(fn, lp, ref, kind, clamp, g):
    base, straight = fa.kl.canonical_kl(kind)
    x = lp.clone().requires_grad_(True)
    v = fn(x, ref, base, straight, clamp)
    (dx,) = torch.autograd.grad(v, x, g)
    return v, dx


def _close(got, want, rtol, what):
    both_nan = torch.isnan(got) & torch.isnan(want)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), what
    got, want = got.double()[~both_nan], want.double()[~both_nan]
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got[torch.isinf(got)],
                                                                             want[torch.isinf(want)]), what
    fin = torch.isfinite(want)
    err = ((got[fin] - want[fin]).abs() / want[fin].abs().clamp_min(1e-30)).max()
    assert err <= rtol, f"{what}: relative error {err:.3g}"


def _setting(family):
    """The backend setting under which eager CPU calls run ``family``'s kernel (Triton: in the interpreter)."""
    if family == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernel on CPU tensors runs in the interpreter (TRITON_INTERPRET=1)")
    return _backend.use_backend("triton" if family == "triton" else "auto")


@pytest.mark.parametrize("family", ["cpp", "triton"])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16,) * 2,
                                    (torch.bfloat16, torch.float32), (torch.float64,) * 2])
@pytest.mark.parametrize("kind,clamp", list(itertools.product(KINDS, [True, False])))
def test_kernel_equals_the_torch_ops_and_the_float64_reference(family, dtypes, kind, clamp):
    lp, ref = _inputs(*dtypes, n=2000 if family == "cpp" else 300)
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
    with _setting(family):
        assert kind in ("k1", "abs") or ops.eager_family(("cpp", "triton"), lp, ref) == family
        v, dx = _value_and_grad(ops.kl_penalty, lp, ref, kind, clamp, g)
    vt, dxt = _value_and_grad(ops.kl_penalty_torch, lp, ref, kind, clamp, g)
    assert v.dtype == torch.float32 and dx.dtype == lp.dtype
    _close(v, vt, 3e-6, f"{kind} value, kernel vs torch ops")
    _close(dx, dxt, 3e-6 if lp.dtype in (torch.float32, torch.float64) else 8e-3, f"{kind} gradient")
    # the float64 reference on the same (rounded) inputs; its gradient through autograd
    x = lp.double().requires_grad_(True)
    vr = R.kl_penalty(x, ref.double(), kind, clamp)
    (dxr,) = torch.autograd.grad(vr, x, g.double())
    vr = torch.where(vr.abs() > torch.finfo(torch.float32).max, vr.float().double(), vr)  # k2(1e20) is inf in fp32
    _close(v, vr.detach(), 2e-6, f"{kind} value vs float64")
    finite = torch.isfinite(lp) & torch.isfinite(ref)  # the reference's autograd at an infinite d: inf - inf
    _close(dx[finite], dxr[finite].to(lp.dtype), 2e-6 if lp.dtype in (torch.float32, torch.float64) else 8e-3,
           f"{kind} gradient vs float64")


def test_eager_cpu_calls_run_the_kernel_and_other_calls_the_torch_ops(monkeypatch):
    lp, ref = _inputs(torch.float32, torch.float32, n=10)
    x = lp.clone().requires_grad_(True)
    assert type(fa.kl_penalty(x, ref).grad_fn).__name__ == "_KlPenaltyEagerBackward"
    calls = []
    core = _backend.compiled()
    monkeypatch.setattr(_backend, "compiled", lambda: calls.append(1) or core)
    fa.kl_penalty(lp, ref, "k2")
    fa.kl_penalty(lp, ref, "k1+")
    assert calls == [1, 1]
    fa.kl_penalty(lp, ref, "k1")  # one torch op
    fa.kl_penalty(lp, ref, "abs")
    with _backend.use_backend("triton"):  # the Triton kernel (in the interpreter on CPU tensors) or the torch ops
        fa.kl_penalty(lp, ref, "k2")
    assert calls == [1, 1]


@pytest.mark.parametrize("family", ["cpp", "triton"])
@pytest.mark.parametrize("reduce", [torch.sum, torch.mean, lambda v: v[3:7].sum()])
def test_the_gradient_of_a_sum_or_a_mean(family, reduce):
    """The upstream gradient of a sum or a mean is one value expanded (read once, not copied); a slice's is not."""
    lp, ref = _inputs(torch.float32, torch.float32, n=100)
    x, y = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    with _setting(family):
        reduce(fa.kl_penalty(x, ref, "k3")).backward()
    reduce(ops.kl_penalty_torch(y, ref, "k3", False, True)).backward()
    _close(x.grad, y.grad, 3e-6, "gradient")


def test_second_derivative_through_the_kernel_path():
    """create_graph=True takes the torch ops' gradient, so it is differentiated again."""
    lp, ref = _inputs(torch.float32, torch.float32, n=50)
    lp, ref = lp[:50], ref[:50]
    x = lp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fa.kl_penalty(x, ref, "k3", kl_clamp=False).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, torch.exp(ref - lp), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["cpp", "triton"])
def test_a_reference_from_an_inference_pass(family):
    """A reference computed under torch.inference_mode (a frozen model's pass) is saved as a copy."""
    lp, ref = _inputs(torch.float32, torch.float32, n=50)
    with torch.inference_mode():
        ref_inf = ref.clone()
    x, y = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    with _setting(family):
        fa.kl_penalty(x, ref_inf).sum().backward()
    ops.kl_penalty_torch(y, ref, "k3", False, True).sum().backward()
    _close(x.grad, y.grad, 3e-6, "gradient")


def test_straight_through_second_derivative():
    """NAME+'s gradient is k2's, d, so its second derivative is 1 (the torch ops; create_graph takes them)."""
    lp, ref = _inputs(torch.float32, torch.float32, n=30)
    lp, ref = lp[:30], ref[:30]
    x = lp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fa.kl_penalty(x, ref, "k3+").sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(g, (lp - ref).detach(), rtol=0, atol=0)
    torch.testing.assert_close(h, torch.ones_like(h), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (), (3, 1, 4)])
def test_shapes_and_layouts(shape):
    lp = torch.randn(shape) if shape else torch.tensor(-1.5)
    ref = lp + 0.3
    for a, b in ((lp, ref), (lp.transpose(0, -1) if lp.dim() > 1 else lp, ref.transpose(0, -1) if ref.dim() > 1
                                                                                  else ref)):
        x = a.clone().requires_grad_(True)
        v = fa.kl_penalty(x, b)
        v.sum().backward()
        want = R.kl_penalty(a.double(), b.double())
        assert v.shape == a.shape and x.grad.shape == a.shape
        torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["k2", "k3", "k3+", "low_var_kl"])
def test_triton_kernel_on_cuda_equals_the_torch_ops(dtype, kind):
    """Eager CUDA calls run the Triton kernel (value and gradient; the gradient of a sum reads one upstream value):
    equal to the torch ops on the same tensors, and to the float64 reference, up to the GPU's exp (a few ulps,
    times e^x / k3(x) <= 11 at the series bound |x| = 0.5)."""
    lp, ref = _inputs(dtype, dtype, n=100000)
    lp, ref = lp.cuda(), ref.cuda()
    assert ops.eager_family(("cpp", "triton"), lp, ref) == "triton"
    for clamp in (True, False):
        for g in (torch.randn(lp.shape, device="cuda"), None):
            x, y = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
            v = fa.kl_penalty(x, ref, kind, kl_clamp=clamp)
            base, straight = fa.kl.canonical_kl(kind)
            vt = ops.kl_penalty_torch(y, ref, base, straight, clamp)
            (v.sum() if g is None else (v * g).sum()).backward()
            (vt.sum() if g is None else (vt * g).sum()).backward()
            want = R.kl_penalty(lp.cpu().double(), ref.cpu().double(), kind, clamp)
            _close(v.cpu(), vt.cpu(), 2e-5, f"{kind} value on CUDA")
            _close(x.grad.cpu(), y.grad.cpu(), 2e-5 if dtype == torch.float32 else 8e-3, f"{kind} gradient on CUDA")
            _close(v.cpu(), want, 2e-5, f"{kind} vs float64")
