"""``masked_whiten`` in eager calls runs one call of the C++ kernel on CPU tensors (csrc/cpu/masked_whiten.cpp) and
three launches of the Triton kernel on CUDA tensors (fastalign/kernels/masked_whiten.py; here in the interpreter);
elsewhere, and where an input takes a gradient, its float64 torch ops run. The kernels against the torch ops (equal
in fp32 and below, float64 up to the order of its sums) and the float64 reference, on every x and mask dtype."""
import math
import os

import pytest
import torch

import fastalign as fa
from fastalign import _backend
from fastalign.ops import masked_whiten as ops
from fastalign.ops._launch import triton_kernels
from fastalign.reference import advantages as R

X_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MASK_DTYPES = [torch.bool, torch.float32, torch.float64, torch.int64, torch.bfloat16]


def _batch(n, seed=0, frac=0.6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3 + 1
    m = torch.rand(n, generator=g) < frac
    x[~m] = torch.where(torch.rand(int((~m).sum()), generator=g) < 0.5, math.nan, math.inf)  # never read
    return x, m


def _torch_ops(x, m, unbiased):
    w = m.to(torch.float64)
    return (ops.weighted_whiten(x, w, 1e-8, unbiased) * w).to(x.dtype)


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 50, 70001])
def test_kernel_equals_the_torch_ops(x_dtype, mask_dtype, unbiased, n):
    x, m = _batch(n)
    x, m = x.to(x_dtype), m.to(mask_dtype)
    got, want = fa.masked_whiten(x, m, unbiased=unbiased), _torch_ops(x, m, unbiased)
    assert got.dtype == x_dtype and got.shape == x.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    if x_dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13, equal_nan=True)
    else:  # one rounding of the same float64 value
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


@pytest.mark.parametrize("unbiased", [True, False])
def test_kernel_against_the_float64_reference(unbiased):
    x, m = _batch(3000, seed=3)
    x2, m2 = x.view(30, 100), m.view(30, 100)
    got = fa.masked_whiten(x2, m2, unbiased=unbiased)
    want = R.masked_whiten(torch.nan_to_num(x2.double(), nan=0.0, posinf=0.0), m2.double(), unbiased=unbiased)
    torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=1e-7)


def test_fractional_weights_and_a_nan_weight():
    x, _ = _batch(40, seed=4, frac=1.0)
    w = torch.rand(40, generator=torch.Generator().manual_seed(5)).round(decimals=1)
    for mask in (w, w.double()):
        torch.testing.assert_close(fa.masked_whiten(x, mask), _torch_ops(x, mask, True), rtol=0, atol=0)
    w[7] = math.nan  # a NaN weight counts: every valid output is NaN, on both paths
    assert torch.isnan(fa.masked_whiten(x, w)[w != 0]).all() and torch.isnan(_torch_ops(x, w, True)[w != 0]).all()


def test_thread_count_does_not_change_the_result():
    x, m = _batch(300001, seed=6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fa.masked_whiten(x, m)
        torch.set_num_threads(max(2, before))
        assert torch.equal(torch.nan_to_num(one), torch.nan_to_num(fa.masked_whiten(x, m)))
    finally:
        torch.set_num_threads(before)


def test_which_path_runs(monkeypatch):
    x, m = _batch(20)
    calls = []
    core = _backend.compiled()
    monkeypatch.setattr(_backend, "compiled", lambda: calls.append(1) or core)
    fa.masked_whiten(x, m)
    assert calls == [1]
    with _backend.use_backend("cuda"):  # a backend without a kernel for CPU tensors: the torch ops
        fa.masked_whiten(x, m)
    xg = torch.nan_to_num(x).requires_grad_(True)  # a gradient: the torch ops, differentiable
    out = fa.masked_whiten(xg, m)
    assert calls == [1] and out.requires_grad
    out.sum().backward()
    assert torch.isfinite(xg.grad).all()
    w = m.float().requires_grad_(True)  # weights that take a gradient: the torch ops too
    out = fa.masked_whiten(torch.nan_to_num(x), w)
    assert calls == [1] and out.requires_grad
    (out * torch.arange(20.0)).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def _interpreted():
    """The backend setting under which eager CPU calls run the Triton kernel, in the interpreter."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel on CPU tensors runs in the interpreter (TRITON_INTERPRET=1)")
    return _backend.use_backend("triton")


def _equal_but_rounding(got, want, dtype):
    """Equal NaN pattern; float64 up to the order of the sums; bf16 up to one ulp (the interpreter rounds fp32 to
    bf16 toward zero, a GPU to nearest); fp32 and fp16 equal."""
    assert got.dtype == dtype and got.shape == want.shape and torch.equal(torch.isnan(got), torch.isnan(want))
    if dtype in (torch.float64, torch.bfloat16):
        tol = 1e-13 if dtype == torch.float64 else 2.0 ** -7
        torch.testing.assert_close(got, want, rtol=tol, atol=1e-13, equal_nan=True)
    else:
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.bfloat16])
@pytest.mark.parametrize("unbiased", [True, False])
def test_triton_kernel_equals_the_torch_ops(x_dtype, mask_dtype, unbiased):
    for n in (0, 1, 2, 3, 50, 3001):
        x, m = _batch(n, seed=n)
        x, m = x.to(x_dtype), m.to(mask_dtype)
        with _interpreted():
            assert ops.eager_family(("cpp", "triton"), x, m) == "triton"
            got = fa.masked_whiten(x, m, unbiased=unbiased)
        _equal_but_rounding(got, _torch_ops(x, m, unbiased), x_dtype)


@pytest.mark.parametrize("unbiased", [True, False])
def test_triton_kernel_over_many_spans_and_steps(monkeypatch, unbiased):
    """Small blocks and few spans (16 tokens a step, 4 spans of 16 steps): every program adds the others' sums."""
    K = triton_kernels("masked_whiten")
    monkeypatch.setattr(K, "BLOCK", 16)
    monkeypatch.setattr(K, "MAX_SPANS", 4)
    assert K.spans_of(1000) == (256, 4)
    x, m = _batch(1000, seed=8)
    w = torch.rand(1000, generator=torch.Generator().manual_seed(9)).round(decimals=1) * m
    for mask in (w, m):
        with _interpreted():
            got = fa.masked_whiten(x, mask, unbiased=unbiased)
        _equal_but_rounding(got, _torch_ops(x, mask, unbiased), torch.float32)
    want = R.masked_whiten(torch.nan_to_num(x.double(), nan=0.0, posinf=0.0), m.double(), unbiased=unbiased)
    torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=1e-7)


def test_triton_kernel_keeps_eps_in_float64():
    """eps reaches the kernel in float64 (a float argument would be rounded to fp32, 6e-9 off at 1e-8): a
    variance below eps (here ~1e-25) is floored at eps exactly, and one above it is kept."""
    x = torch.tensor([1.0, 1.0 + 2.0 ** -40, 1.0], dtype=torch.float64)
    m = torch.ones(3, dtype=torch.bool)
    for eps in (1e-8, 3e-30):
        with _interpreted():
            got = fa.masked_whiten(x, m, eps=eps, unbiased=False)
        torch.testing.assert_close(got, _torch_ops_eps(x, m, eps), rtol=1e-15, atol=0)


def _torch_ops_eps(x, m, eps):
    w = m.to(torch.float64)
    return (ops.weighted_whiten(x, w, eps, False) * w).to(x.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mask_dtype", ["bool", "x"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_triton_kernel_on_cuda_equals_the_torch_ops(x_dtype, mask_dtype, unbiased):
    """Eager CUDA calls run the Triton kernel: equal to the torch ops on the same tensors up to the order of the
    float64 sums (one ulp of x's dtype at most), over more than one span; a bool mask, or one of x's dtype (as the
    advantage estimators pass it)."""
    x, m = _batch(3_000_000, seed=10)
    x, m = x.to(x_dtype).cuda(), m.cuda()
    m = m if mask_dtype == "bool" else m.to(x_dtype)
    assert ops.eager_family(("cpp", "triton"), x, m) == "triton"
    got, want = fa.masked_whiten(x, m, unbiased=unbiased).cpu(), _torch_ops(x, m, unbiased).cpu()
    assert got.dtype == x_dtype and torch.equal(torch.isnan(got), torch.isnan(want))
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10,
           torch.float64: 1e-13}[x_dtype]
    torch.testing.assert_close(got, want, rtol=ulp, atol=1e-13, equal_nan=True)
