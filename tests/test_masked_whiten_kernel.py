"""``masked_whiten`` on eager CPU tensors runs one call of the C++ kernel (csrc/cpu/masked_whiten.cpp); elsewhere,
and where x takes a gradient, its float64 torch ops run. The kernel against the torch ops (equal in fp32 and
below, float64 up to the order of its sums) and the float64 reference, on every x and mask dtype."""
import math

import pytest
import torch

import fastalign as fa
from fastalign import _backend
from fastalign.ops import masked_whiten as ops
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
    with _backend.use_backend("triton"):  # a backend without this kernel: the torch ops
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
