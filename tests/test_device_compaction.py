"""Device compaction: the Triton paths put the labelled rows first and run the LM-head products over
those rows only, their count read on the device (no host sync). Checked in the Triton interpreter:

* the bounded product against float64 slices, with NaN in everything it must not read;
* unscored rows cost nothing and hide nothing: NaN hidden states at prompt / padding positions reach
  no log-prob and no gradient, on the two-pass path (many chunks, some without a labelled row), on
  the single pass of the policy and preference losses, as on the C++ path, which finds the
  labelled rows on the host;
* FASTALIGN_DEVICE_COMPACTION=0 multiplies every row (and gives the same numbers on finite inputs).
"""
from __future__ import annotations

import pytest
import torch

import fastalign
from fastalign import reference
from fastalign.ops import device_compaction
from fastalign.ops.device_compaction import compact, matmul_live
from helpers import assert_close

triton = pytest.importorskip("triton")

M, K, N = 40, 37, 45  # not multiples of the interpreter's 16 x 32 x 16 tiles


@pytest.fixture(autouse=True)
def compaction_on(monkeypatch):
    monkeypatch.delenv("FASTALIGN_DEVICE_COMPACTION", raising=False)


@pytest.mark.parametrize("live", [0, 5, 16, 37])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_over_live_rows(live, accumulate, dtype):
    """live_dim 0: ``out[:live] (+)= a[:live] @ b``; the other rows are 0 (or kept when accumulating),
    and the dead rows of ``a`` (NaN here) are never read."""
    g = torch.Generator().manual_seed(live)
    a = torch.randn(M, K, generator=g).to(dtype)
    a[live:] = float("nan")
    b = torch.randn(K, N, generator=g).to(dtype)
    before = torch.randn(M, N, generator=g)
    out = before.clone().to(dtype)
    matmul_live(out, a, b, torch.tensor([live]), 0, accumulate)
    expected = a[:live].double() @ b.double()
    if accumulate:
        expected = expected + before[:live].to(dtype).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out[:live], expected, atol=tol, rtol=tol, what="live rows")
    rest = before[live:].to(dtype) if accumulate else torch.zeros(M - live, N, dtype=dtype)
    assert torch.equal(out[live:], rest)


@pytest.mark.parametrize("live", [0, 7, 16, 40])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("operands", [torch.float32, torch.bfloat16])
def test_product_over_live_tokens(live, accumulate, operands):
    """live_dim 1 (d(weight) += dz.T @ h): the shared dimension stops at ``live``; ``a`` is a transposed
    view, ``out`` fp32 while the operands may be bf16; rows past ``live`` (NaN) are never read."""
    g = torch.Generator().manual_seed(100 + live)
    dz = torch.randn(M, K, generator=g).to(operands)  # M token rows, K vocabulary ids
    h = torch.randn(M, N, generator=g).to(operands)
    dz[live:], h[live:] = float("nan"), float("nan")
    before = torch.randn(K, N, generator=g)
    out = before.clone()
    matmul_live(out, dz.t(), h, torch.tensor([live]), 1, accumulate)
    expected = dz[:live].double().T @ h[:live].double() + (before.double() if accumulate else 0.0)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what="d weight")


def test_compaction_puts_labelled_rows_first_in_order():
    labels = torch.tensor([-100, 4, -100, -100, 7, 1, -100, 9])
    c = compact(labels, -100)
    assert c.order.tolist() == [1, 4, 5, 7, 0, 2, 3, 6]
    assert c.live.tolist() == [4]
    assert c.live_in(0, 3).tolist() == [3] and c.live_in(3, 6).tolist() == [1] and c.live_in(6, 8).tolist() == [0]
    assert torch.equal(c.scatter(c.gather(labels)), labels)


def test_switch_is_checked(monkeypatch):
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", "yes")
    with pytest.raises(ValueError, match="FASTALIGN_DEVICE_COMPACTION"):
        compact(torch.tensor([1, -100]), -100)
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", "0")
    assert compact(torch.tensor([1, -100]), -100) is None


def _head(n=23, h=24, v=131, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    bias = torch.randn(v, generator=g) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 1, 2, 3, 4, 9, 10, 17, 22]] = -100  # a prompt, a tool span, padding at the end
    return hidden, weight, bias, labels


def _two_pass(hidden, weight, bias, labels, backend, **kw):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    st = fastalign.linear_logprobs(*leaves[:2], labels, bias=leaves[2], entropy=True, sum_p2=True,
                                   backend=backend, **kw)
    (st.logprobs * 0.7 - st.entropy * 0.2 + st.sum_p2).sum().backward()
    return st, [t.grad for t in leaves]


@pytest.mark.parametrize("path", [("cpp", None), ("triton", None), ("triton", (3, 64))],
                         ids=["cpp", "triton", "triton-3-token-chunks"])
def test_nan_hidden_at_unscored_rows_reaches_nothing(path):
    """NaN hidden states at ignored positions (a fully masked padding row can give them): every
    statistic and gradient equals the float64 reference with those rows left out (d hidden 0 there)."""
    backend, chunk = path
    hidden, weight, bias, labels = _head()
    ignored = labels == -100
    poisoned = hidden.masked_fill(ignored[:, None], float("nan"))
    st, grads = _two_pass(poisoned, weight, bias, labels, backend, chunk=chunk)

    leaves = [t.detach().double().requires_grad_(True) for t in (hidden.masked_fill(ignored[:, None], 0.0), weight,
                                                                  bias)]
    lp, ent, sp2, *_ = reference.linear_logprobs(*leaves[:2], labels, bias=leaves[2], dtype=torch.float64)
    (lp * 0.7 - ent * 0.2 + sp2).sum().backward()
    for name, got, want in (("logprobs", st.logprobs, lp), ("entropy", st.entropy, ent),
                            ("sum_p2", st.sum_p2, sp2)):
        assert_close(got, want, atol=1e-5, rtol=1e-5, what=name)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, leaves):
        assert_close(got, want.grad, atol=1e-5, rtol=1e-5, what=name)
    assert torch.equal(grads[0][ignored], torch.zeros_like(grads[0][ignored]))


def test_low_rank_term_is_compacted_too():
    """With a LoRA head the low-rank rows ``a`` follow the hidden rows: NaN at ignored rows reach nothing."""
    hidden, weight, bias, labels = _head(seed=3)
    g = torch.Generator().manual_seed(4)
    a, lw = torch.randn(hidden.shape[0], 4, generator=g), torch.randn(weight.shape[0], 4, generator=g) * 0.2
    ignored = (labels == -100)[:, None]

    def grads(h, a_, backend):
        leaves = [t.clone().requires_grad_(True) for t in (h, weight, a_, lw)]
        st = fastalign.linear_logprobs(leaves[0], leaves[1], labels, low_rank=(leaves[2], leaves[3]),
                                       entropy=True, backend=backend, chunk=(4, 64) if backend == "triton" else None)
        (st.logprobs - 0.3 * st.entropy).sum().backward()
        return [st.logprobs.detach()] + [t.grad for t in leaves]

    want = grads(hidden.masked_fill(ignored, 0.0), a.masked_fill(ignored, 0.0), "cpp")
    got = grads(hidden.masked_fill(ignored, float("nan")), a.masked_fill(ignored, float("nan")), "triton")
    for name, x, y in zip(("logprobs", "d hidden", "d weight", "d a", "d L"), got, want):
        assert_close(x, y, atol=1e-5, rtol=1e-5, what=name)


def test_switched_off_multiplies_every_row(monkeypatch):
    """FASTALIGN_DEVICE_COMPACTION=0: the products run over every row (no bounded product is called),
    with the same numbers on finite inputs."""
    hidden, weight, bias, labels = _head(seed=5)
    on = _two_pass(hidden, weight, bias, labels, "triton")
    calls = []
    monkeypatch.setattr(device_compaction, "matmul_live", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", "0")
    off = _two_pass(hidden, weight, bias, labels, "triton")
    assert calls == []
    for x, y in zip([on[0].logprobs, on[0].entropy, *on[1]], [off[0].logprobs, off[0].entropy, *off[1]]):
        assert_close(x, y, atol=1e-5, rtol=1e-5)


def _policy_batch(seed=0, B=4, T=9, H=16, V=97):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    bias = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :4] = False  # prompts
    mask[2, 6] = False  # a tool token
    mask[3, 7:] = False  # padding
    old = torch.randn(B, T, generator=g) * 0.1 - 4.0
    return hidden, weight, bias, labels, mask, old, torch.randn(B, generator=g)


@pytest.mark.parametrize("block_mib", ["1e-6", "64"], ids=["a-sequence-a-block", "one-block"])
def test_policy_single_pass_skips_unscored_rows(block_mib, monkeypatch):
    """LinearPolicyLoss's single pass on the Triton kernels: blocks compacted on the device; NaN hidden
    at the unscored positions reach neither the loss nor a gradient, and the result equals the C++
    two-pass path on the same batch with those rows finite."""
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", block_mib)
    hidden, weight, bias, labels, mask, old, adv = _policy_batch()
    config = dict(loss_type="grpo", eps_high=0.28, entropy_coef=0.01)

    def run(h, backend, single_pass):
        leaves = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
        loss_fn = fastalign.LinearPolicyLoss(backend=backend, single_pass=single_pass, **config)
        loss, metrics = loss_fn(leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2])
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    poisoned = hidden.masked_fill(~mask[..., None], float("nan"))
    got = run(poisoned, "triton", True)
    want = run(hidden, "cpp", False)
    for name, x, y in zip(("loss", "d hidden", "d weight", "d bias"), got, want):
        y = y.masked_fill(~mask[..., None], 0.0) if name == "d hidden" else y
        assert_close(x, y, atol=2e-5, rtol=2e-5, what=name)


def test_preference_single_pass_skips_unscored_rows():
    """LinearPreferenceLoss's single pass with the rows left whole (``compact=False``) on the Triton
    kernels: prompt rows with NaN hidden states reach nothing; equal to the C++ path."""
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 8, 16, 89
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels[4, 6:] = -100
    ref_c, ref_r = torch.randn(B, generator=g) - 20.0, torch.randn(B, generator=g) - 20.0

    def run(h, backend, **kw):
        leaves = [t.clone().requires_grad_(True) for t in (h, weight)]
        loss_fn = fastalign.LinearPreferenceLoss(loss_type="sigmoid", beta=0.1, backend=backend, **kw)
        loss, metrics = loss_fn(leaves[0], leaves[1], labels, ref_chosen_logprobs=ref_c,
                                ref_rejected_logprobs=ref_r)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    unscored = (labels == -100)[..., None]
    got = run(hidden.masked_fill(unscored, float("nan")), "triton", compact=False, single_pass=True)
    want = run(hidden, "cpp", single_pass=False)
    for name, x, y in zip(("loss", "d hidden", "d weight"), got, want):
        y = y.masked_fill(unscored, 0.0) if name == "d hidden" else y
        assert_close(x, y, atol=2e-5, rtol=2e-5, what=name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("accumulate", [False, True])
def test_dead_rows_stay_clean_when_b_is_not_finite(value, accumulate):
    """live_dim 0 with a NaN or an inf in ``b``: the dead rows that share a tile with live ones multiplied
    it by A's zeros (0 * NaN, 0 * inf: NaN) and stored that; they stay 0 (or unchanged when accumulating)
    now, while the live rows hold the float64 product, non-finite values included."""
    live = 5  # rows 5..15 share the first 16-row tile with the live ones
    g = torch.Generator().manual_seed(11)
    a = torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g)
    b[3, 7] = value
    before = torch.randn(M, N, generator=g)
    out = before.clone()
    matmul_live(out, a, b, torch.tensor([live]), 0, accumulate)
    expected = a[:live].double() @ b.double() + (before[:live].double() if accumulate else 0.0)
    torch.testing.assert_close(out[:live].double(), expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.equal(out[live:], before[live:] if accumulate else torch.zeros(M - live, N))


def _non_finite_head_grads(backend, call):
    """d hidden of a tiny batch whose head holds one NaN, by ``call``; with the unscored positions."""
    g = torch.Generator().manual_seed(12)
    B, T, H, V = 2, 4, 8, 19
    hidden = torch.randn(2 * B, T, H, generator=g).requires_grad_(True)
    weight = torch.randn(V, H, generator=g) * 0.5
    weight[3, 0] = float("nan")
    weight.requires_grad_(True)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, 0] = -100
    if call == "linear_logprobs":
        st = fastalign.linear_logprobs(hidden, weight, labels, backend=backend)
        st.logprobs.sum().backward()
    elif call == "LinearPolicyLoss":
        mask = labels != -100
        loss_fn = fastalign.LinearPolicyLoss(loss_type="grpo", backend=backend)
        loss, _ = loss_fn(hidden, weight, labels.clamp(min=0), torch.full(labels.shape, -3.0),
                          torch.randn(2 * B, generator=g), mask)
        loss.backward()
    else:
        loss_fn = fastalign.LinearPreferenceLoss(loss_type="sigmoid", backend=backend, compact=False)
        loss, _ = loss_fn(hidden, weight, labels)
        loss.backward()
    return hidden.grad, labels == -100


@pytest.mark.parametrize("call", ["linear_logprobs", "LinearPolicyLoss", "LinearPreferenceLoss"])
def test_non_finite_head_reaches_no_unscored_row(call):
    """A NaN in the LM head: the gradient of the hidden states at unscored positions (ignore_index, or
    outside the policy's response mask) is 0 on the Triton kernels as on the C++ ones, and the NaNs of the
    scored rows are the same on both (docs/backends.md)."""
    got, unscored = _non_finite_head_grads("triton", call)
    want, _ = _non_finite_head_grads("cpp", call)
    assert torch.equal(got[unscored], torch.zeros_like(got[unscored]))
    assert torch.equal(got.isnan(), want.isnan())
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="d hidden")
