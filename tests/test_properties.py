"""Property tests: random shapes (0, 1, primes), dtypes, masks, ignore labels, temperatures,
extreme logits and vocabulary chunks, against the float64 references of fastalign.reference,
on the C++ kernels and the Triton interpreter.

Example counts come from the hypothesis profile (tests/conftest.py): a small, reproducible
``default`` and ``HYPOTHESIS_PROFILE=slow`` for many more. The hardest cases also have fixed
examples; tolerances are those of the dtype, never loosened for a case.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastalign as fa
from fastalign.aggregate import counts_read
from fastalign.reference import advantages as ref_adv
from fastalign.reference import divergence as ref_div
from fastalign.reference import linear as ref_lin
from fastalign.reference import logprobs as ref_lp
from fastalign.reference import policy as ref_pol
from fastalign.reference import preference as ref_pref
from conftest import CPU_BACKENDS

F64 = torch.float64
LOW = (torch.float32, torch.bfloat16, torch.float16)
ROWS = st.sampled_from([0, 1, 2, 3, 5, 7, 11])
VOCAB = st.sampled_from([1, 2, 3, 5, 7, 13, 31])
SEEDS = st.integers(0, 2 ** 31 - 1)



def mismatch(actual, expected, *, atol, rtol=0.0):
    """None when close (NaN matches NaN, an infinity matches the same infinity), else a message."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    same = (torch.isnan(a) & torch.isnan(e)) | (a == e)
    err = torch.where(same, torch.zeros_like(a), (a - e).abs())
    bad = ~(err <= atol + rtol * e.abs().nan_to_num(posinf=0.0, neginf=0.0))
    if not bad.any():
        return None
    i = int(bad.flatten().nonzero()[0])
    return (f"{int(bad.sum())} of {a.numel()} off; first at {i}: got {a.flatten()[i].item()}, "
            f"expected {e.flatten()[i].item()} (atol={atol}, rtol={rtol})")


def check(what, actual, expected, *, atol, rtol=0.0):
    msg = mismatch(actual, expected, atol=atol, rtol=rtol)
    if msg is not None:
        raise AssertionError(f"{what}: {msg}")


def fp_tol(dtype):
    """Tolerance of a result rounded to ``dtype`` (gradients come back in the input dtype)."""
    return {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, F64: 1e-10}[dtype]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(g, N, V, ignore_index, p_ignore=0.3):
    y = torch.randint(0, V, (N,), generator=g)
    return torch.where(torch.rand(N, generator=g) < p_ignore, torch.full_like(y, ignore_index), y)


# ----------------------------------------------------------------------------- elementwise_divergence
ELEMENTWISE = [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("jsd", {"beta": 0.37}), ("kl", {}),
               ("kl", {"log_target": True}), ("tvd", {})]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(N=ROWS, V=VOCAB, dtype=st.sampled_from(LOW), case=st.sampled_from(ELEMENTWISE), elementwise=st.booleans(),
       scale=st.sampled_from([0.5, 3.0, 30.0]), seed=SEEDS)
def test_elementwise_divergence(backend, N, V, dtype, case, elementwise, scale, seed):
    """Per-token sums (or every term) and d(input) under a random upstream gradient, with ignored tokens, against the
    float64 terms of the same (rounded) values; the sums in fp32, the gradient one rounding of the input dtype."""
    divergence, options = case
    g = _gen(seed)
    zx, zy = torch.randn(N, V, generator=g) * scale, torch.randn(N, V, generator=g) * scale
    x = (zx.softmax(-1) if divergence == "tvd" else zx.log_softmax(-1)).to(dtype)
    y = (zy.log_softmax(-1) if divergence == "jsd" or options.get("log_target") else zy.softmax(-1)).to(dtype)
    labels = _labels(g, N, V, -100)
    leaf = x.clone().requires_grad_(True)
    out = fa.elementwise_divergence(leaf, y, labels, divergence=divergence, elementwise=elementwise, backend=backend,
                                    **options)
    xd = x.double().requires_grad_(True)
    terms = ref_div.elementwise_terms(xd, y, divergence=divergence, **options) * (labels != -100)[:, None]
    want = terms if elementwise else terms.sum(-1)
    w = torch.randn(want.shape, generator=g, dtype=F64)
    (out * w).sum().backward()
    (want * w).sum().backward()
    check("divergence", out, want, atol=1e-5, rtol=1e-4)
    check("d(input)", leaf.grad, xd.grad, atol=1e-6, rtol=fp_tol(dtype))


# ----------------------------------------------------------------------------- token_logprobs
def _token_case(backend, logits, labels, temperature, ignore_index, grad=True):
    dtype = logits.dtype
    x = logits.clone().requires_grad_(grad)
    st_ = fa.token_logprobs(x, labels, temperature=temperature, ignore_index=ignore_index, entropy=True,
                           sum_p2=True, backend=backend)
    x64 = logits.detach().to(F64).requires_grad_(grad)
    lp, ent, sp2, _ = ref_lp.token_logprobs(x64, labels, temperature=temperature, ignore_index=ignore_index,
                                            dtype=F64)
    tol = 2e-5
    check("logprobs", st_.logprobs, lp, atol=tol, rtol=tol)
    check("entropy", st_.entropy, ent, atol=tol, rtol=tol)
    check("sum_p2", st_.sum_p2, sp2, atol=tol, rtol=tol)
    if grad and logits.numel() and torch.isfinite(lp).all():
        w = torch.linspace(-1.0, 1.0, labels.numel(), dtype=F64).view(labels.shape)
        (st_.logprobs * w.float()).sum().backward()
        (lp * w).sum().backward()
        gt = fp_tol(dtype)
        check("d logits", x.grad, x64.grad, atol=gt, rtol=gt)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(N=ROWS, V=VOCAB, dtype=st.sampled_from(LOW), temperature=st.sampled_from([1.0, 0.6, 1.7]),
       ignore=st.sampled_from(["neg", "zero", "last"]), scale=st.sampled_from([1.0, 6.0]), seed=SEEDS)
def test_token_logprobs(backend, N, V, dtype, temperature, ignore, scale, seed):
    g = _gen(seed)
    ignore_index = {"neg": -100, "zero": 0, "last": V - 1}[ignore]
    logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    _token_case(backend, logits, _labels(g, N, V, ignore_index), temperature, ignore_index)


EXTREME_N, EXTREME_V = st.sampled_from([1, 2, 5]), st.sampled_from([2, 3, 7, 13])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(N=EXTREME_N, V=EXTREME_V, dtype=st.sampled_from(LOW), kind=st.sampled_from(["neg_inf_entries", "neg_inf_row"]),
       seed=SEEDS)
def test_token_logprobs_infinite_logits(backend, N, V, dtype, kind, seed):
    """-inf logits (a masked vocabulary range) give the reference's finite log-probs; an all -inf row
    gives a NaN row, as log_softmax does."""
    g = _gen(seed)
    logits = torch.randn(N, V, generator=g)
    if kind == "neg_inf_entries":  # never the whole row
        logits[:, : V // 2] = -math.inf
    else:
        logits[0] = -math.inf
    labels = torch.randint(V // 2 if kind == "neg_inf_entries" else 0, V, (N,), generator=g)
    _token_case(backend, logits.to(dtype), labels, 1.0, -100, grad=kind != "neg_inf_row")


# Fixed examples of the hardest cases (no shrinking): NaN rows, rows far from 0, the vocabulary
# chunks at an ignore_index offset or entirely -inf.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("N, V", [(1, 2), (3, 7), (5, 13)])
def test_token_logprobs_nan_logit_gives_nan_row(backend, dtype, N, V):
    g = _gen(N * V)
    logits = torch.randn(N, V, generator=g)
    logits[0, V // 2] = math.nan
    _token_case(backend, logits.to(dtype), torch.randint(0, V, (N,), generator=g), 1.0, -100)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_argmax_leaves_nan_out_and_is_0_without_a_logit_above_minus_inf(backend):
    """The argmax of the logits other than NaN, the lowest index among ties; 0 for a row of only -inf and NaN
    logits, from logits and from a head (docs/bad-inputs.md)."""
    nan, ninf = math.nan, -math.inf
    z = torch.tensor([[nan, ninf, ninf, ninf], [ninf] * 4, [nan] * 4, [nan, ninf, 2.0, 2.0], [nan, -3.0, ninf, nan]])
    expected = [0, 0, 0, 2, 1]
    got = fa.token_logprobs(z, torch.zeros(5, dtype=torch.long), argmax=True, backend=backend).argmax
    assert got.tolist() == expected
    for row, want in zip(z, expected):  # logits h W^T = row, with h = [1] and W = row as a column
        got = fa.linear_logprobs(torch.ones(1, 1), row[:, None].contiguous(), torch.zeros(1, dtype=torch.long),
                                 argmax=True, backend=backend).argmax
        assert got.tolist() == [want], row


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("N, V", [(1, 2), (4, 7), (5, 13)])
def test_token_logprobs_large_logits(backend, dtype, N, V):
    """Rows around +-1e4: the log-probs keep fp32 rounding of the log-prob itself."""
    g = _gen(N * V)
    logits = torch.randn(N, V, generator=g) + torch.where(torch.rand(N, 1, generator=g) < 0.5, -1e4, 1e4)
    _token_case(backend, logits.to(dtype), torch.randint(0, V, (N,), generator=g), 1.0, -100)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_large_logits_at_a_temperature(backend):
    """Rows around +-1e3 at T = 0.7 (docs/bad-inputs.md): the C++ kernels subtract the row max before dividing
    by T (fp32 rounding of the log-prob itself); the Triton kernels divide first, as the trainers' logits / T,
    within a few ulp of max |z| / T."""
    g = _gen(17)
    logits = torch.randn(6, 37, generator=g) + torch.where(torch.rand(6, 1, generator=g) < 0.5, -1e3, 1e3)
    labels = torch.randint(0, 37, (6,), generator=g)
    got = fa.token_logprobs(logits, labels, temperature=0.7, backend=backend).logprobs
    want = ref_lp.token_logprobs(logits.to(F64), labels, temperature=0.7, ignore_index=-100, dtype=F64)[0]
    ulp = 2.0 ** (math.floor(math.log2(logits.abs().max().item() / 0.7)) - 23)
    tol = 4 * ulp if backend == "triton" else 2e-5
    check("logprobs", got, want, atol=tol, rtol=0)


@pytest.mark.parametrize("vocab_chunk", [None, 5], ids=["one-piece", "pieces"])
def test_linear_logprobs_cpp_large_logits_at_a_temperature(vocab_chunk):
    """linear_logprobs on the C++ kernels subtracts the row max before dividing by T, as token_logprobs does: on
    exact fp32 logits around 1e5 at T = 0.7 the log-prob is within fp32 rounding of itself, in one vocabulary
    piece or merged from several (it divided first: an error of ulp(max |z| / T), about 0.009 here)."""
    g = _gen(18)
    V = 37
    logits = 1e5 + torch.randint(-40, 41, (4, V), generator=g).float() / 8  # exact in fp32
    labels = torch.randint(0, V, (4,), generator=g)
    got = fa.linear_logprobs(logits, torch.eye(V), labels, temperature=0.7, backend="cpp",
                             **({} if vocab_chunk is None else dict(chunk=(4, vocab_chunk)))).logprobs
    want = torch.log_softmax(logits.to(F64) / 0.7, -1).gather(-1, labels[:, None])[:, 0]
    check("logprobs", got, want, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- linear_logprobs
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(N=ROWS, V=VOCAB, H=st.sampled_from([1, 2, 5]), dtype=st.sampled_from(LOW),
       temperature=st.sampled_from([1.0, 0.7]), softcap=st.sampled_from([None, 3.0]),
       ignore=st.sampled_from(["neg", "zero", "two"]), vocab_chunk=st.sampled_from([1, 2, 3, 5, None]),
       bias=st.booleans(), masked_range=st.booleans(), seed=SEEDS)
def test_linear_logprobs(backend, N, V, H, dtype, temperature, softcap, ignore, vocab_chunk, bias, masked_range,
                         seed):
    g = _gen(seed)
    ignore_index = {"neg": -100, "zero": 0, "two": 2}[ignore]
    vc = V if vocab_chunk is None else min(vocab_chunk, V)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias or masked_range else None
    lo = hi = 0
    if masked_range and V > 1:  # a bias that masks a vocabulary range (never the whole vocabulary)
        lo = int(torch.randint(0, V - 1, (1,), generator=g))
        hi = int(torch.randint(lo + 1, V, (1,), generator=g))
        b[lo:hi] = -math.inf
    labels = _labels(g, N, V, ignore_index)
    if hi > lo:  # labels outside the masked range: their log-probs stay finite
        labels = torch.where((labels >= lo) & (labels < hi), torch.full_like(labels, V - 1), labels)
    _linear_case(backend, hidden, weight, b, labels, temperature, softcap, ignore_index, vc)


def _linear_case(backend, hidden, weight, b, labels, temperature, softcap, ignore_index, vc):
    N, dtype = hidden.shape[0], hidden.dtype
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    got = fa.linear_logprobs(h, w, labels, bias=b, temperature=temperature, softcap=softcap,
                             ignore_index=ignore_index, entropy=True, backend=backend, chunk=(max(1, N // 2), vc))
    h64 = hidden.to(F64).requires_grad_()
    w64 = weight.to(F64).requires_grad_()
    lp, ent, _sp2, _ = ref_lin.linear_logprobs(h64, w64, labels, bias=None if b is None else b.to(F64),
                                               temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                                               dtype=F64)
    tol = 5e-5
    check("logprobs", got.logprobs, lp, atol=tol, rtol=tol)
    check("entropy", got.entropy, ent, atol=tol, rtol=tol)
    if N:
        cot = torch.linspace(-1.0, 1.0, N, dtype=F64)
        (got.logprobs * cot.float()).sum().backward()
        (lp * cot).sum().backward()
        gt = 4 * fp_tol(dtype)
        check("d hidden", h.grad, h64.grad, atol=gt, rtol=gt)
        check("d weight", w.grad, w64.grad, atol=gt, rtol=gt)


@pytest.mark.parametrize("case", ["ignore_index_at_chunk_start", "all_neg_inf_chunk"])
@pytest.mark.parametrize("V, vc", [(6, 2), (9, 3), (20, 3)])
def test_linear_logprobs_chunk_edges(case, V, vc):
    """The C++ path over several vocabulary chunks: a real label at a chunk start + ignore_index, and a
    chunk whose logits are all -inf."""
    g = _gen(V * vc)
    N, H = 4, 3
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    b, lo, hi, ignore_index = None, 0, 0, -100
    labels = torch.randint(0, V, (N,), generator=g)
    if case == "ignore_index_at_chunk_start":
        ignore_index = 1
        labels[0] = vc + ignore_index  # the second chunk's start + ignore_index: a real token
    else:
        b = torch.zeros(V)
        lo, hi = vc, 2 * vc  # exactly the second chunk
        b[lo:hi] = -math.inf
        labels = torch.where((labels >= lo) & (labels < hi), torch.zeros_like(labels), labels)
    _linear_case("cpp", hidden, weight, b, labels, 1.0, None, ignore_index, vc)


# ----------------------------------------------------------------------------- kl_penalty, aggregate_loss
@given(B=ROWS, T=ROWS, dtype=st.sampled_from(LOW),
       kind=st.sampled_from(["k1", "abs", "k2", "k3", "low_var_kl", "k3+", "k1+"]), clamp=st.booleans(),
       scale=st.sampled_from([0.5, 5.0, 40.0]), seed=SEEDS)
def test_kl_penalty(B, T, dtype, kind, clamp, scale, seed):
    g = _gen(seed)
    lp = (torch.randn(B, T, generator=g) * scale).to(dtype)
    rf = (torch.randn(B, T, generator=g) * scale).to(dtype)
    x = lp.clone().requires_grad_()
    got = fa.kl_penalty(x, rf, kind, kl_clamp=clamp)
    x64 = lp.to(F64).requires_grad_()
    want = ref_pol.kl_penalty(x64, rf.to(F64), kind, clamp)
    big = not clamp and kind.startswith("k3") and scale > 10  # exp of up to ~e^200: fp32 overflows to inf
    tol = 1e-5
    if not big:
        check("kl", got, want, atol=tol, rtol=tol)
    if B * T and not big:
        got.sum().backward()
        want.sum().backward()
        # the gradient comes back in the input dtype: compare with the reference rounded to it (fp16 overflows)
        check("d logprobs", x.grad, x64.grad.to(dtype), atol=fp_tol(dtype), rtol=fp_tol(dtype))


AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@given(B=ROWS, T=ROWS, dtype=st.sampled_from(LOW), agg=st.sampled_from(AGGS),
       mask_dtype=st.sampled_from([torch.bool, torch.float32, torch.int64]), junk=st.booleans(),
       counts=st.sampled_from([None, "int", "tensor"]), dp_size=st.sampled_from([1, 3]), seed=SEEDS)
def test_aggregate_loss(B, T, dtype, agg, mask_dtype, junk, counts, dp_size, seed):
    g = _gen(seed)
    L = torch.randn(B, T, generator=g).to(dtype)
    m = torch.rand(B, T, generator=g) < 0.6
    kw = {}
    if counts is not None:
        n_tok, n_seq = int(m.sum()) + 3, int((m.sum(-1) > 0).sum()) + 1
        kw = counts_read(agg, **(dict(global_tokens=n_tok, global_seqs=n_seq) if counts == "int"
                                 else dict(global_tokens=torch.tensor(float(n_tok)), global_seqs=torch.tensor(n_seq))))
        kw["dp_size"] = dp_size
    Lj = torch.where(m, L, torch.tensor(math.nan if junk else 0.0, dtype=dtype))  # masked slots never count
    x = Lj.clone().requires_grad_()
    got = fa.aggregate_loss(x, m.to(mask_dtype), agg, **kw)
    x64 = L.to(F64).requires_grad_()
    want = ref_pol.aggregate_loss(x64, m, agg, **{k: (v.item() if isinstance(v, torch.Tensor) else v)
                                                   for k, v in kw.items()})
    if not m.any():  # documented: no valid token gives 0 and a zero gradient (the reference may give 0/0)
        got.backward()
        assert got.item() == 0.0 and not x.grad.any()
        return
    check("loss", got, want, atol=1e-5, rtol=1e-5)
    got.backward()
    want.backward()
    check("d loss", torch.where(m, x.grad, torch.zeros_like(x.grad)), x64.grad, atol=fp_tol(dtype), rtol=1e-3)
    assert not x.grad[~m].any()


# ----------------------------------------------------------------------------- sequence_logprobs
@given(S=ROWS, T=ROWS, dtype=st.sampled_from(LOW + (F64,)), weights=st.booleans(),
       mask_kind=st.sampled_from(["bool", "float", "labels", "none"]), ignore_index=st.sampled_from([-100, 0, 3]),
       seed=SEEDS)
def test_sequence_logprobs_padded(S, T, dtype, weights, mask_kind, ignore_index, seed):
    g = _gen(seed)
    lp = (-torch.rand(S, T, generator=g) * 5).to(dtype)
    m = torch.rand(S, T, generator=g) < 0.7
    tw = torch.rand(S, T, generator=g).to(dtype) if weights else None
    kw = {}
    if mask_kind == "bool":
        kw["response_mask"] = m
    elif mask_kind == "float":
        kw["response_mask"] = m.to(dtype)
    elif mask_kind == "labels":
        y = torch.randint(0, 9, (S, T), generator=g)
        y = torch.where(m, torch.where(y == ignore_index, y + 1, y), torch.full_like(y, ignore_index))
        kw.update(labels=y, ignore_index=ignore_index)
    else:
        m = torch.ones(S, T, dtype=torch.bool)
    x = lp.clone().requires_grad_()
    got = fa.sequence_logprobs(x if mask_kind != "none" else x, token_weights=tw, **kw)
    x64 = lp.to(F64).requires_grad_()
    s, mean, count = ref_pref.sequence_logprobs(x64, m, token_weights=None if tw is None else tw.to(F64))
    tol = 1e-5 if dtype != F64 else 1e-12
    check("sum", got.sum, s, atol=tol, rtol=tol)
    check("mean", got.mean, mean, atol=tol, rtol=tol)
    check("count", got.count, count, atol=0)
    if S * T:
        got.sum.sum().backward()
        s.sum().backward()
        check("d logps", x.grad, x64.grad, atol=fp_tol(dtype), rtol=fp_tol(dtype))


@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6), pad=st.integers(0, 3), seed=SEEDS,
       layout=st.sampled_from(["cu_seqlens", "position_ids"]))
def test_sequence_logprobs_packed_equals_padded(lengths, pad, seed, layout):
    g = _gen(seed)
    S, N = len(lengths), sum(lengths)
    flat = torch.randn(N + pad, generator=g, dtype=F64)
    cu = torch.tensor([0] + lengths).cumsum(0)
    if layout == "cu_seqlens":
        got = fa.sequence_logprobs(flat, cu_seqlens=cu)
    else:
        if 0 in lengths or pad:  # an empty sequence has no position 0; trailing padding would form a sequence
            lengths = [max(n, 1) for n in lengths]
            cu = torch.tensor([0] + lengths).cumsum(0)
            N, pad = sum(lengths), 0
            flat = torch.randn(N, generator=g, dtype=F64)
        pos = torch.cat([torch.arange(n) for n in lengths])
        got = fa.sequence_logprobs(flat, position_ids=pos, num_sequences=S)
    T = max(lengths)
    padded = torch.zeros(S, max(T, 1), dtype=F64)
    mask = torch.zeros(S, max(T, 1), dtype=torch.bool)
    for i, n in enumerate(lengths):
        padded[i, :n] = flat[int(cu[i]):int(cu[i]) + n]
        mask[i, :n] = True
    s, mean, count = ref_pref.sequence_logprobs(padded, mask)
    check("sum", got.sum, s, atol=1e-12)
    check("mean", got.mean, mean, atol=1e-12)
    check("count", got.count, count, atol=0)


# ----------------------------------------------------------------------------- group_advantages
@given(sizes=st.lists(st.integers(1, 5), min_size=0, max_size=7), dtype=st.sampled_from([torch.float32, F64]),
       estimator=st.sampled_from(["grpo", "rloo", "grpo_passk", "gpg"]), std=st.sampled_from(["group", "none",
                                                                                              "batch"]),
       ties=st.booleans(), nan=st.booleans(), shuffle=st.booleans(), seed=SEEDS)
def test_group_advantages(sizes, dtype, estimator, std, ties, nan, shuffle, seed):
    g = _gen(seed)
    B = sum(sizes)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)) \
        if sizes else torch.zeros(0, dtype=torch.long)
    scores = torch.randn(B, generator=g, dtype=F64)
    if ties:
        scores = scores.round()
    if nan and B:
        scores[0] = math.nan
    if shuffle and B:
        perm = torch.randperm(B, generator=g)
        scores, index = scores[perm], index[perm]
    scores = scores.to(dtype)
    kw = dict(estimator=estimator)
    if estimator in ("grpo", "grpo_passk"):
        kw["std"] = std
    got = fa.group_advantages(scores, index * 7919 - 3, **kw)  # any key values
    want = ref_adv.group_advantages(scores.to(F64), index, **kw)
    tol = 2e-4 if dtype == torch.float32 else 1e-9  # fp32 scores: std division amplifies rounding
    check("advantages", got, want, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- policy_loss
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(B=ROWS, T=st.sampled_from([0, 1, 2, 3, 7]), dtype=st.sampled_from(LOW),
       loss_type=st.sampled_from(["ppo", "reinforce", "cispo", "gspo"]), agg=st.sampled_from(AGGS),
       adv_rows=st.booleans(), kl=st.booleans(), seed=SEEDS)
def test_policy_loss(backend, B, T, dtype, loss_type, agg, adv_rows, kl, seed):
    g = _gen(seed)
    lp = (-torch.rand(B, T, generator=g) * 3).to(dtype)
    old = (lp.float() + 0.3 * torch.randn(B, T, generator=g)).to(dtype)
    adv = torch.randn(B, generator=g).to(dtype) if adv_rows else torch.randn(B, T, generator=g).to(dtype)
    m = torch.rand(B, T, generator=g) < 0.7
    rf = (lp.float() + 0.2 * torch.randn(B, T, generator=g)).to(dtype) if kl else None
    kw = dict(loss_type=loss_type, agg=agg, kl_coef=0.05 if kl else 0.0)
    x = lp.clone().requires_grad_()
    got, metrics = fa.policy_loss(x, old, adv, m, ref_logprobs=rf, backend=backend, **kw)
    x64 = lp.to(F64).requires_grad_()
    A = adv.to(F64)[:, None].expand(B, T) if adv_rows else adv.to(F64)
    want, wm = ref_pol.policy_loss(x64, old.to(F64), A, m, ref_logprobs=None if rf is None else rf.to(F64), **kw)
    check("loss", got, want, atol=2e-5, rtol=2e-5)
    check("clipfrac", metrics["clipfrac"], wm["clipfrac"], atol=1e-6)
    got.backward()
    want.backward()
    check("d logprobs", x.grad, x64.grad, atol=fp_tol(dtype), rtol=fp_tol(dtype))


# ----------------------------------------------------------------------------- preference_loss
@given(B=ROWS, dtype=st.sampled_from(LOW + (F64,)),
       loss_type=st.sampled_from(["sigmoid", "ipo", "hinge", "simpo", "kto", "aot", "robust"]),
       beta=st.sampled_from([0.1, 0.5, 2.0]), smoothing=st.sampled_from([0.0, 0.1]), ref=st.booleans(),
       scale=st.sampled_from([1.0, 3.0]), seed=SEEDS)  # beta * margin < 745: log(sigmoid) of the f64 reference
def test_preference_loss(B, dtype, loss_type, beta, smoothing, ref, scale, seed):
    g = _gen(seed)
    lc, lr = ((-torch.rand(B, generator=g) * scale * 10).to(dtype) for _ in range(2))
    lc0, lr0 = ((-torch.rand(B, generator=g) * scale * 10).to(dtype) for _ in range(2))
    nc, nr = (torch.randint(1, 9, (B,), generator=g).to(F64) for _ in range(2))
    if loss_type in ("hinge", "ipo", "kto", "simpo"):
        smoothing = 0.0
    c, r = lc.clone().requires_grad_(), lr.clone().requires_grad_()
    kw = dict(chosen_lengths=nc, rejected_lengths=nr) if loss_type in ("ipo", "simpo") else {}
    got, _ = fa.preference_loss(c, r, lc0 if ref else None, lr0 if ref else None, loss_type=loss_type, beta=beta,
                                label_smoothing=smoothing, **kw)
    c64, r64 = lc.to(F64).requires_grad_(), lr.to(F64).requires_grad_()
    if B == 0:  # documented: an empty batch gives 0 with zero gradients (the reference's mean is NaN)
        assert got.item() == 0.0
        return
    want, _ = ref_pref.preference_loss(c64, r64, lc0.to(F64) if ref else None, lr0.to(F64) if ref else None,
                                       loss_types=(loss_type,), beta=beta, eps=smoothing,
                                       nc=kw.get("chosen_lengths"), nr=kw.get("rejected_lengths"))
    tol = 1e-5 if dtype != F64 else 1e-10
    check("loss", got, want, atol=tol, rtol=tol)
    got.backward()
    want.backward()
    check("d chosen", c.grad, c64.grad, atol=fp_tol(dtype), rtol=fp_tol(dtype))
    check("d rejected", r.grad, r64.grad, atol=fp_tol(dtype), rtol=fp_tol(dtype))
