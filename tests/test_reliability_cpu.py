"""Reliability of the C++ CPU kernels: no silent wrong number at the edges.

Each test pins one failure class against a float64 plain-PyTorch reference:
vocabulary chunks and ignore_index, masked (-inf) vocabulary ranges, log-prob
precision at large logits and low temperature, in-place backward on
overlapping logits, NaN/inf in masked token slots, group statistics of scores
near the double range, and determinism across repeats and Python threads.
"""
import math
import threading

import pytest
import torch

import fastalign as fa
from fastalign.advantages import masked_whiten
from fastalign.reference import advantages as ref_adv
from helpers import rank_body


def _lp64(logits, labels, temperature=1.0):
    """float64 log_softmax(logits / T) at the labels (the reference)."""
    x = logits.double() / temperature
    return torch.log_softmax(x, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- linear_logprobs: vocabulary chunks
@pytest.mark.parametrize("ignore_index", [0, 3, 7])
def test_linear_label_at_chunk_start_plus_ignore_index_is_not_ignored(ignore_index):
    torch.manual_seed(0)
    V, vc = 40, 10
    h = torch.randn(6, 4, requires_grad=True)
    W = torch.randn(V, 4, requires_grad=True)
    # labels v0 + ignore_index for every chunk start v0 > 0, plus an ignored row and a plain one
    y = torch.tensor([10 + ignore_index, 20 + ignore_index, 30 + ignore_index, ignore_index, 5 if ignore_index != 5 else 6, 39])
    st = fa.linear_logprobs(h, W, y, ignore_index=ignore_index, entropy=True, backend="cpp", chunk=(4, vc))
    z = h.detach().double() @ W.detach().double().T
    expect = _lp64(z, y.clamp_min(0))
    expect[y == ignore_index] = 0.0
    torch.testing.assert_close(st.logprobs.double(), expect, atol=2e-5, rtol=0)
    # gradients: against autograd through float64 log_softmax with the ignored row dropped
    (st.logprobs.sum() + 0.5 * st.entropy.sum()).backward()
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    logp = torch.log_softmax(h64 @ W64.T, -1)
    keep = (y != ignore_index).double()
    lp64 = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1) * keep
    ent64 = -(logp.exp() * logp).sum(-1) * keep
    (lp64.sum() + 0.5 * ent64.sum()).backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(W.grad.double(), W64.grad, atol=1e-4, rtol=1e-4)


def test_linear_issue_repro_pad_id_zero_two_chunks():
    torch.manual_seed(0)
    h, W = torch.randn(4, 4), torch.randn(20000, 4)
    y = torch.tensor([10000, 0, 5, 19999])
    st = fa.linear_logprobs(h, W, y, ignore_index=0, backend="cpp", chunk=(4, 10000))
    expect = _lp64(h.double() @ W.double().T, y)
    expect[1] = 0.0
    torch.testing.assert_close(st.logprobs.double(), expect, atol=2e-5, rtol=0)


@pytest.mark.parametrize("vc", [8, 16, 48])
def test_linear_masked_vocabulary_chunk_is_an_empty_piece(vc):
    """A bias of -inf over a whole vocabulary chunk: that chunk has no mass, nothing turns NaN."""
    torch.manual_seed(1)
    V = 48
    h = torch.randn(5, 6, requires_grad=True)
    W = torch.randn(V, 6, requires_grad=True)
    b = torch.zeros(V)
    b[16:32] = float("-inf")
    y = torch.tensor([0, 3, 40, 47, 20])  # the last label sits in the masked range: log-prob -inf
    st = fa.linear_logprobs(h, W, y, bias=b, entropy=True, sum_p2=True, argmax=True, backend="cpp", chunk=(2, vc))
    z = h.detach().double() @ W.detach().double().T + b.double()
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    torch.testing.assert_close(st.logprobs.double(), logp.gather(-1, y[:, None])[:, 0], atol=2e-5, rtol=0)
    ent = -(torch.where(p > 0, p * logp, 0.0)).sum(-1)
    torch.testing.assert_close(st.entropy.double(), ent, atol=2e-5, rtol=0)
    torch.testing.assert_close(st.sum_p2.double(), (p * p).sum(-1), atol=2e-6, rtol=1e-5)
    assert torch.equal(st.argmax, z.argmax(-1))
    st.logprobs[:4].sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    torch.log_softmax(h64 @ W64.T + b.double(), -1).gather(-1, y[:4, None]).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(W.grad.double(), W64.grad, atol=1e-4, rtol=1e-4)


def test_linear_logprobs_precise_at_large_logits():
    """Logits around 1e4 (several chunks): the log-prob keeps fp32 accuracy of itself, not of 1e4."""
    torch.manual_seed(2)
    V = 64
    h = torch.randn(8, 4)
    W = torch.randn(V, 4)
    b = torch.full((V,), 1e4) + torch.randn(V)  # z ~ 1e4 + O(1)
    y = torch.randint(0, V, (8,))
    for chunk in [(8, V), (3, 16)]:
        st = fa.linear_logprobs(h, W, y, bias=b, backend="cpp", chunk=chunk)
        z = (torch.addmm(b, h, W.T)).double()  # the fp32 logits the kernel sees, exactly
        torch.testing.assert_close(st.logprobs.double(), _lp64(z, y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("offset,temperature", [(1e4, 1.0), (200.0, 1.0 / 64)])
@pytest.mark.parametrize("chunk", [(8, 64), (3, 16)])
def test_linear_gradients_precise_at_large_logits(offset, temperature, chunk):
    """d(logprob + 0.3 entropy) through the fp32 logits the kernel sees, against float64 on those
    same logits: the saved fp32 lse (off by ~ulp(1e4) / 2) must not reach the probabilities."""
    torch.manual_seed(12)
    V = 64
    h = torch.randn(8, 4, requires_grad=True)
    W = torch.randn(V, 4, requires_grad=True)
    b = (offset + torch.randn(V) * 2.0 * temperature).requires_grad_()  # x = z / T a few units apart
    y = torch.randint(0, V, (8,))
    st = fa.linear_logprobs(h, W, y, bias=b, temperature=temperature, entropy=True, backend="cpp", chunk=chunk)
    (st.logprobs.sum() + 0.3 * st.entropy.sum()).backward()
    z = torch.addmm(b.detach(), h.detach(), W.detach().T).double().requires_grad_()  # the kernel's logits
    logp = torch.log_softmax(z / temperature, -1)
    (logp.gather(-1, y[:, None]).sum() - 0.3 * (logp.exp() * logp).sum()).backward()
    dz = z.grad
    tol = 2e-5 / temperature
    torch.testing.assert_close(b.grad.double(), dz.sum(0), atol=tol, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), dz @ W.detach().double(), atol=tol, rtol=1e-5)
    torch.testing.assert_close(W.grad.double(), dz.T @ h.detach().double(), atol=tol, rtol=1e-5)


# ---------------------------------------------------------------- token_logprobs precision
def test_token_logprobs_precision_at_max_1e4():
    torch.manual_seed(3)
    x = (1e4 + torch.randn(16, 100)).float()
    y = torch.randint(0, 100, (16,))
    st = fa.token_logprobs(x, y, backend="cpp")
    torch.testing.assert_close(st.logprobs.double(), _lp64(x, y), atol=2e-6, rtol=0)


def test_token_logprobs_constant_row_of_1e30_gives_minus_log_v():
    V = 11
    x = torch.full((3, V), 1e30)
    y = torch.tensor([0, 5, 10])
    st = fa.token_logprobs(x, y, entropy=True, backend="cpp")
    torch.testing.assert_close(st.logprobs.double(), torch.full((3,), -math.log(V), dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(st.entropy.double(), torch.full((3,), math.log(V), dtype=torch.float64),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale,temperature", [(1e4, 1.0), (30.0, 1.0 / 256), (200.0, 1.0 / 64), (25.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_gradients_at_large_logits_and_low_temperature(scale, temperature, dtype):
    """d(logprob + 0.3 entropy + 0.2 sum_p2)/d(logits) against float64 autograd on the same inputs.
    Temperatures are powers of two, so logits / T is exact in fp32 and both sides see the same x."""
    torch.manual_seed(4)
    V = 50
    base = scale + torch.randn(6, V) * (4.0 * temperature)  # a few units apart after / T
    logits = base.to(dtype).requires_grad_()
    y = torch.randint(0, V, (6,))
    st = fa.token_logprobs(logits, y, temperature=temperature, entropy=True, sum_p2=True, backend="cpp")
    (st.logprobs.sum() + 0.3 * st.entropy.sum() + 0.2 * st.sum_p2.sum()).backward()
    x64 = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(x64 / temperature, -1)
    p = logp.exp()
    ((logp.gather(-1, y[:, None]).sum()) - 0.3 * (p * logp).sum() + 0.2 * (p * p).sum()).backward()
    torch.testing.assert_close(st.logprobs.double(), logp.gather(-1, y[:, None])[:, 0].detach(), atol=2e-6, rtol=0)
    g, g64 = logits.grad.double(), x64.grad
    if dtype == torch.float32:
        # fp32 rounding of p (and of the summed terms), times 1 / T
        torch.testing.assert_close(g, g64, atol=1e-5 / temperature, rtol=1e-5)
    else:  # the gradient is stored in bf16: its own rounding, 2^-8 relative
        torch.testing.assert_close(g, g64.to(dtype).double(), atol=1e-6 / temperature, rtol=2 ** -7)


def test_token_logprobs_all_minus_inf_row_is_nan_like_log_softmax():
    x = torch.tensor([[float("-inf")] * 5, [0.0, 1.0, float("-inf"), 2.0, 3.0]])
    y = torch.tensor([1, 3])
    st = fa.token_logprobs(x, y, entropy=True, backend="cpp")
    ref_lp = torch.log_softmax(x.double(), -1).gather(-1, y[:, None])[:, 0]
    assert torch.isnan(st.logprobs[0]) and torch.isnan(ref_lp[0])
    torch.testing.assert_close(st.logprobs[1].double(), ref_lp[1], atol=1e-6, rtol=0)
    assert torch.isnan(st.entropy[0]) and torch.isfinite(st.entropy[1])


# ---------------------------------------------------------------- inplace_backward on overlapping logits
def test_inplace_backward_refuses_expanded_logits():
    y = torch.tensor([1, 2, 3, 4])
    expanded = torch.randn(1, 32).expand(4, 32)
    with pytest.raises(ValueError, match="inplace_backward"):
        fa.token_logprobs(expanded, y, inplace_backward=True, backend="cpp")
    overlapping = torch.randn(40).as_strided((4, 32), (2, 1))
    with pytest.raises(ValueError, match="inplace_backward"):
        fa.token_logprobs(overlapping, y, inplace_backward=True, backend="cpp")
    # out-of-place on the same views is fine and matches the reference
    st = fa.token_logprobs(expanded, y, backend="cpp")
    torch.testing.assert_close(st.logprobs.double(), _lp64(expanded, y), atol=1e-6, rtol=0)


def test_inplace_backward_accepts_sliced_and_transposed_logits():
    torch.manual_seed(5)
    base = torch.randn(3, 6, 20)
    y = torch.randint(0, 20, (3, 5))
    for view in (base[:, :-1], base.transpose(0, 1)[:5].transpose(0, 1)):
        x = view.detach().clone().requires_grad_()
        st = fa.token_logprobs(x * 1.0, y, inplace_backward=True, backend="cpp")  # not a leaf: in place
        st.logprobs.sum().backward()
        x64 = view.double().requires_grad_()
        torch.log_softmax(x64, -1).gather(-1, y[..., None]).sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)
    # a non-dense (sliced) logits view given straight to the op with in-place backward
    holder = torch.randn(3, 6, 20)
    src = holder.clone().requires_grad_()
    full = src * 1.0
    st = fa.token_logprobs(full[:, :-1], y, inplace_backward=True, backend="cpp")
    st.logprobs.sum().backward()
    x64 = holder.double().requires_grad_()
    torch.log_softmax(x64[:, :-1], -1).gather(-1, y[..., None]).sum().backward()
    torch.testing.assert_close(src.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- token-level estimators: masked slots
def _poison(x, mask, value):
    return torch.where(mask != 0, x, torch.full_like(x, value))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_slots_never_reach_valid_tokens(value, dtype, cpu_backend):
    torch.manual_seed(6)
    value = torch.finfo(dtype).max if value == "max" else value
    B, T = 4, 9
    r = torch.randn(B, T, dtype=dtype)
    v = torch.randn(B, T, dtype=dtype)
    lp, rlp = torch.randn(B, T, dtype=dtype), torch.randn(B, T, dtype=dtype)
    mask = (torch.rand(B, T) > 0.3).to(dtype)
    mask[:, -1] = 0  # padding at the end
    mask[1, 2] = 0  # and a hole in the middle
    base = torch.randn(B, dtype=dtype)
    out_adv = torch.randn(B, dtype=dtype)
    index = torch.tensor([0, 0, 1, 1])
    calls = {
        "reinforce_pp": lambda r_, v_, lp_: fa.reinforce_pp_advantages(r_, mask, gamma=0.9),
        "remax": lambda r_, v_, lp_: fa.remax_advantages(r_, mask, base),
        "gae": lambda r_, v_, lp_: torch.stack(fa.gae_advantages(r_, v_, mask, gamma=0.95, lam=0.9)),
        "implicit": lambda r_, v_, lp_: fa.implicit_process_advantages(lp_, rlp, mask, out_adv, gamma=0.9),
        "whiten": lambda r_, v_, lp_: masked_whiten(r_, mask),
        "optimal_token_baseline": lambda r_, v_, lp_: fa.optimal_token_baseline_advantages(  # the advantages
            r_, mask, index, lp_, v_.abs())[0],
    }
    expect = {
        "reinforce_pp": ref_adv.reinforce_pp_advantages(r, mask, gamma=0.9),
        "remax": ref_adv.remax_advantages(r, mask, base),
        "gae": torch.stack(ref_adv.gae_advantages(r, v, mask, gamma=0.95, lam=0.9)),
        "implicit": ref_adv.implicit_process_advantages(lp, rlp, mask, out_adv, gamma=0.9),
        "whiten": ref_adv.masked_whiten(r.double(), mask.double()),
        "optimal_token_baseline": ref_adv.optimal_token_baseline_advantages(r, mask, index, lp, v.abs())[0],
    }
    for name, fn in calls.items():
        with fa.use_backend(cpu_backend):
            clean = fn(r, v, lp)
            dirty = fn(_poison(r, mask, value), _poison(v, mask, value), _poison(lp, mask, value))
        assert torch.equal(clean, dirty), f"{name}: a masked slot changed the result"
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(clean.double(), expect[name].double(), atol=tol, rtol=tol, msg=name)
        assert (clean.reshape(-1, B, T)[:, mask == 0] == 0).all(), f"{name}: masked outputs must be 0"


# ---------------------------------------------------------------- group statistics near the double range
def _grpo64_scaled(scores, group_size, eps, e):
    """float64 GRPO computed on scores * 2^-e (no overflow there), mapped back: the std is 2^e times
    the scaled std, the mean 2^e times the scaled mean."""
    x = torch.ldexp(scores, torch.tensor(-e)).view(-1, group_size)
    mean = x.mean(1, keepdim=True)
    sd = x.std(1, keepdim=True)
    return ((x - mean) / (sd + eps * 2.0 ** -e)).view(-1)


@pytest.mark.parametrize("magnitude", [2e154, 1e200, 1e300, 1.7e308])
@pytest.mark.parametrize("layout", ["group_size", "index"])
def test_group_advantages_do_not_overflow_near_the_double_range(magnitude, layout):
    torch.manual_seed(7)
    G, n = 5, 4
    scores = torch.rand(G * n, dtype=torch.float64) * magnitude * 0.9
    scores[4:8] *= -1  # a group of negative scores
    scores[8:12] = magnitude * 0.5  # an all-equal group: advantages exactly 0
    scores[13] = float("nan")  # a NaN score stays out of its group
    if layout == "index":
        kw = dict(index=torch.arange(G).repeat_interleave(n))
    else:
        kw = dict(group_size=n)
    adv = fa.group_advantages(scores, estimator="grpo", backend="cpp", **kw)
    assert torch.isfinite(adv).all()
    expect = _grpo64_scaled(scores.nan_to_num(0.0), n, 1e-6, 1000)
    # the NaN score's group: its three finite members against themselves
    g3 = torch.ldexp(scores[12:16][[0, 2, 3]], torch.tensor(-1000))
    expect[12:16] = 0.0
    expect[[12, 14, 15]] = (g3 - g3.mean()) / g3.std()
    expect[8:12] = 0.0
    torch.testing.assert_close(adv, expect, atol=1e-12, rtol=1e-12)
    assert (adv[8:12] == 0).all() and adv[13] == 0
    # the statistics themselves, and the other estimators on the generic path
    for est in ("rloo", "grpo_passk", "gpg"):
        out = fa.group_advantages(scores, estimator=est, backend="cpp", **kw)
        assert not torch.isnan(out).any(), est
    sd = fa.group_advantages(scores[:4], group_size=4, estimator="grpo", backend="cpp")
    assert sd.abs().max() < 2.0  # |A| <= (n - 1) / sqrt(n) for n = 4


@pytest.mark.parametrize("layout", ["group_size", "index"])
def test_length_weighted_baseline_near_the_double_range(layout):
    """opo runs the statistics path (mean, std, wmean per group): sum L x overflows here unscaled."""
    scores = torch.tensor([5e307, 1.5e308, -1e308, 2.5e307, 7e250, 7e250], dtype=torch.float64)
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 1.0], dtype=torch.float64)
    if layout == "index":
        kw = dict(index=torch.tensor([0, 0, 0, 0, 1, 1]))
    else:
        scores, lengths, kw = scores[:4], lengths[:4], dict(group_size=4)
    out = fa.group_advantages(scores, estimator="opo", backend="cpp", lengths=lengths, **kw)
    x = torch.ldexp(scores[:4], torch.tensor(-1024))
    L = lengths[:4]
    wmean = (L * x).sum() / L.sum()
    torch.testing.assert_close(out[:4], torch.ldexp(x - wmean, torch.tensor(1024)), rtol=1e-12, atol=0)
    if layout == "index":
        assert (out[4:] == 0).all()


# ---------------------------------------------------------------- determinism, threads, large offsets
def _token_step(x, y, **kw):
    leaf = x.detach().clone().requires_grad_()
    st = fa.token_logprobs(leaf, y, entropy=True, backend="cpp", **kw)
    (st.logprobs.sum() + 0.1 * st.entropy.sum()).backward()
    return st.logprobs.detach(), st.entropy.detach(), leaf.grad


def _token_level_step(r, v, mask):
    return torch.stack([*fa.gae_advantages(r, v, mask, gamma=0.99, lam=0.95),
                        fa.reinforce_pp_advantages(r, mask, gamma=0.99)])


def _ops_once(data):
    x, y, h, W, yl, scores, index, r, v, mask = data
    st = fa.linear_logprobs(h, W, yl, entropy=True, backend="cpp", chunk=(64, 96))
    return (*_token_step(x, y), st.logprobs, st.entropy,
            fa.group_advantages(scores, index, backend="cpp"),
            fa.group_advantages(scores, index, estimator="grpo_passk", backend="cpp"),
            _token_level_step(r, v, mask))


def _ops_data(seed=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 4096, generator=g) * 3  # 2^21 elements: two threads where there are two cores
    y = torch.randint(0, 4096, (512,), generator=g)
    h, W = torch.randn(200, 16, generator=g), torch.randn(300, 16, generator=g)
    yl = torch.randint(0, 300, (200,), generator=g)
    scores = torch.randn(1 << 19, generator=g)  # past the parallel threshold of group_advantages
    index = torch.randint(0, 1 << 15, (1 << 19,), generator=g)
    r, v = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    mask = (torch.rand(1024, 1024, generator=g) > 0.2).float()
    return x, y, h, W, yl, scores, index, r, v, mask


def _assert_bitwise(a, b, what):
    for i, (u, w) in enumerate(zip(a, b)):
        assert torch.equal(u, w) or (u.isnan() == w.isnan()).all() and torch.equal(u.nan_to_num(), w.nan_to_num()), \
            f"{what}: output {i} differs"


def test_bitwise_repeatable_and_independent_of_the_thread_count():
    data = _ops_data()
    first = _ops_once(data)
    _assert_bitwise(first, _ops_once(data), "repeat")
    n = torch.get_num_threads()
    try:
        for k in (1, 3):
            torch.set_num_threads(k)
            _assert_bitwise(first, _ops_once(data), f"{k} threads")
    finally:
        torch.set_num_threads(n)


def test_four_concurrent_python_threads_get_the_single_thread_results():
    data = _ops_data()
    expect = _ops_once(data)
    got, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(2):
                got[i] = _ops_once(data)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        _assert_bitwise(expect, got[i], f"thread {i}")


def test_row_offsets_past_2_31_through_a_strided_view():
    """Rows 2^31 + 2V elements apart in one (untouched, lazily mapped) bf16 buffer."""
    V = 64
    big = 2 ** 31 + 2 * V
    try:
        store = torch.empty(big + 2 * V, dtype=torch.bfloat16)
    except RuntimeError:  # pragma: no cover - a machine without 4 GiB of address space to spare
        pytest.skip("cannot reserve a 4 GiB buffer")
    logits = store.as_strided((2, 2, V), (big, V, 1))
    src = torch.randn(2, 2, V).to(torch.bfloat16)
    logits.copy_(src)
    y = torch.tensor([[1, 63], [0, 17]])
    lp, ent, grad = _token_step(logits, y)
    expect = _lp64(src.float(), y)
    torch.testing.assert_close(lp.double(), expect, atol=1e-5, rtol=0)
    lp2, _, grad2 = _token_step(src, y)
    assert torch.equal(lp, lp2) and torch.equal(grad, grad2)
    assert grad.shape == (2, 2, V)
    del logits, store


def test_out_of_range_labels_give_a_nan_row_and_check_raises():
    torch.manual_seed(9)
    x = torch.randn(4, 10)
    y = torch.tensor([10, -5, 3, -100])
    st = fa.token_logprobs(x, y, entropy=True, backend="cpp")
    assert torch.isnan(st.logprobs[:2]).all()
    torch.testing.assert_close(st.logprobs[2].double(), _lp64(x[2:3], y[2:3])[0], atol=1e-6, rtol=0)
    assert st.logprobs[3] == 0 and st.entropy[3] == 0
    assert torch.isfinite(st.entropy[:3]).all()  # entropy does not need the label
    with pytest.raises(ValueError, match="labels"):
        fa.token_logprobs(x, y, check=True, backend="cpp")
    h, W = torch.randn(4, 3), torch.randn(10, 3)
    st = fa.linear_logprobs(h, W, y, backend="cpp", chunk=(2, 4))
    assert torch.isnan(st.logprobs[:2]).all() and st.logprobs[3] == 0
    torch.testing.assert_close(st.logprobs[2].double(), _lp64(h[2:3] @ W.T, y[2:3])[0], atol=1e-5, rtol=0)


def _vocab_parallel_ignore_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with rank_body():
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(10)
        h, W = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
        y = torch.tensor([20, 0, 21, 5, 39, 19])  # 20 = rank 1's first id + ignore_index 0; 0 is ignored
        vr = W.shape[0] // world
        hl = h.clone().requires_grad_(True)
        st = fa.linear_logprobs(hl, W[rank * vr:(rank + 1) * vr], y, ignore_index=0, entropy=True,
                                vocab_group=dist.group.WORLD, backend="cpp", chunk=(4, 7))
        st.logprobs.sum().backward()
        torch.save({"lp": st.logprobs.detach(), "dh": hl.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_vocab_parallel_label_at_shard_start_plus_ignore_index():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_vocab_parallel_ignore_worker, args=(2, port, d), nprocs=2, join=True)
        res = [torch.load(f"{d}/rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(10)
    h, W = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    y = torch.tensor([20, 0, 21, 5, 39, 19])
    h64 = h.double().requires_grad_()
    lp = torch.log_softmax(h64 @ W.double().T, -1).gather(-1, y[:, None])[:, 0] * (y != 0)
    lp.sum().backward()
    for out in res:
        torch.testing.assert_close(out["lp"].double(), lp.detach(), atol=2e-5, rtol=0)
        torch.testing.assert_close(out["dh"].double(), h64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_runs_the_parallel_kernels():
    """DataLoader workers fork after the helper threads exist: the child must not wait on them."""
    import os

    x, y = torch.randn(512, 4096), torch.randint(0, 4096, (512,))
    expect = fa.token_logprobs(x, y, backend="cpp").logprobs  # two threads: helpers started
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        ok = torch.equal(fa.token_logprobs(x, y, backend="cpp").logprobs, expect)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
