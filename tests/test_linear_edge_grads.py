"""Gradients of the fused linear (hidden x lm_head) log-probs at the edges of their inputs:

* a NaN or an inf in the head reaches no unscored row's d(hidden) on the two-pass Triton path with
  FASTALIGN_DEVICE_COMPACTION=0 (every row through the products), as with compaction and on the C++ path
  (docs/backends.md#unscored-tokens);
* at a temperature, the C++ path's d(hidden), d(weight), d(bias) are within fp32 rounding of the float64
  gradient at any |z| / T, as its log-probs are (docs/bad-inputs.md).
"""
from __future__ import annotations

import math

import pytest
import torch

import fastalign
from conftest import HAS_TRITON
from helpers import assert_close

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the interpreter on CPU tensors)")


def _non_finite_head_grads(backend, call, value):
    """(d hidden, d a or None) of 6 rows, 3 of them unscored, whose head holds one ``value`` (NaN or inf)."""
    g = torch.Generator().manual_seed(21)
    n, h, v, r = 6, 8, 40, 3
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = torch.randn(v, h, generator=g) * 0.5
    weight[3, 0] = value
    weight.requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 2, 5]] = -100
    a = None
    if call == "linear_logprobs":
        a = torch.randn(n, r, generator=g).requires_grad_(True)
        lw = torch.randn(v, r, generator=g) * 0.2
        lw[7, 1] = value
        st = fastalign.linear_logprobs(hidden, weight, labels, low_rank=(a, lw.requires_grad_(True)), entropy=True,
                                       backend=backend, chunk=(4, v) if backend == "triton" else None)
        (st.logprobs - 0.3 * st.entropy).sum().backward()
    else:
        mask = (labels != -100).view(2, 3)
        loss_fn = fastalign.LinearPolicyLoss(loss_type="grpo", entropy_coef=0.01, backend=backend, single_pass=False)
        loss, _ = loss_fn(hidden.view(2, 3, h), weight, labels.clamp(min=0).view(2, 3), torch.full((2, 3), -3.0),
                          torch.tensor([0.5, -0.3]), mask)
        loss.backward()
    return hidden.grad, None if a is None else a.grad, labels == -100


@needs_triton
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("call", ["linear_logprobs", "LinearPolicyLoss"])
def test_non_finite_head_reaches_no_unscored_row_without_compaction(call, value, monkeypatch):
    """FASTALIGN_DEVICE_COMPACTION=0: the two-pass Triton backward multiplies every row, an unscored row's zero
    d(logits) by the head's NaN / inf too; its d(hidden) (and d a of a low-rank term) is still exactly 0, and
    the scored rows equal the C++ path's, NaN for NaN."""
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", "0")
    got_h, got_a, unscored = _non_finite_head_grads("triton", call, value)
    want_h, want_a, _ = _non_finite_head_grads("cpp", call, value)
    for name, got, want in (("d hidden", got_h, want_h), ("d a", got_a, want_a)):
        if got is None:
            continue
        assert torch.equal(got[unscored], torch.zeros_like(got[unscored])), name
        assert torch.equal(got.isnan(), want.isnan()), name
        assert_close(got, want, atol=1e-5, rtol=1e-5, what=name)


def _exact_head(T, seed=0):
    """6 rows x 40 ids whose logits ``h @ W.T + b`` (about 1e3 + O(T)) are exact in fp32: every ``(z_j - z_k) / T``
    is O(1) while ``|z| / T`` is 1e3 / T."""
    g = torch.Generator().manual_seed(seed)
    n, h, v = 6, 8, 40
    unit = 2.0 ** max(-13, min(-6, math.floor(math.log2(T)) - 7))
    hidden = torch.randint(-4, 5, (n, h), generator=g).float()
    weight = torch.randint(-32, 33, (v, h), generator=g).float() * unit
    bias = 1e3 + torch.randint(-32, 33, (v,), generator=g).float() * unit
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    exact = hidden.double() @ weight.double().T + bias.double()
    assert torch.equal(torch.addmm(bias, hidden, weight.T).double(), exact)
    return hidden, weight, bias, labels, [torch.randn(n, generator=g) for _ in range(3)]


@pytest.mark.parametrize("vocab_chunk", [None, 7], ids=["one-piece", "pieces"])
@pytest.mark.parametrize("T", [0.3, 0.0171, 0.0071])
def test_cpp_gradients_at_a_temperature_within_fp32_rounding(T, vocab_chunk):
    """|z| / T from 3e3 to 1.4e5 at temperatures whose 1 / T is not exact in fp32: d(hidden), d(weight), d(bias)
    within a few fp32 roundings of the float64 gradient (their own rounding is about 2e-7 of their largest
    element here). The renormalising mass of the backward formed z_j / T with the float64 1 / T while the kernel
    used its fp32 rounding: p was off by |z| / T * 2^-24 relative (3e-5 at T = 0.3, 1e-2 at T = 0.0071)."""
    hidden, weight, bias, labels, (gl, ge, gq) = _exact_head(T)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    st = fastalign.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], temperature=T, entropy=True,
                                   sum_p2=True, backend="cpp", chunk=None if vocab_chunk is None else (6, vocab_chunk))
    (gl * st.logprobs + ge * st.entropy + gq * st.sum_p2).sum().backward()

    ref = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    ls = torch.log_softmax((ref[0] @ ref[1].T + ref[2]) / T, -1)
    p = ls.exp()
    keep = labels != -100
    lp = ls.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    ((gl.double() * lp - ge.double() * (p * ls).sum(-1) + gq.double() * (p * p).sum(-1)) * keep).sum().backward()
    for name, got, want in zip(("d hidden", "d weight", "d bias"), leaves, ref):
        assert_close(got.grad, want.grad, atol=2e-6 * want.grad.abs().max().item(), what=name)
