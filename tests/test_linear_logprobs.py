"""linear_logprobs against the float64 reference that builds the full logits (docs/math.md#token-statistics),
on the C++ path (BLAS chunks + row kernels) and the Triton kernels in the interpreter."""
import os
import socket

import pytest
import torch

import fastalign
from fastalign import reference
from fastalign.ops.linear_stats import linear_stats, linear_stats_backward
from fastalign.ops.vocab_pieces import merge_pieces
from helpers import assert_close, rank_body

N, H, V = 17, 40, 203  # not a multiple of any block size

# The C++ path with chunks far smaller than the shapes (many token and vocabulary
# chunks, ragged tails) and with the automatic chunking; the Triton interpreter.
BACKENDS = [("cpp", (5, 37)), ("cpp", None), ("triton", (5, 64))]
BACKEND_IDS = ["cpp-chunked", "cpp-auto", "triton"]


@pytest.fixture(params=BACKENDS, ids=BACKEND_IDS)
def path(request):
    return request.param


def make_inputs(n=N, h=H, v=V, dtype=torch.float32, seed=0, bias=True, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    labels[0], labels[-1] = 0, v - 1  # vocabulary edges
    return hidden, weight, b, labels


def run_both(hidden, weight, bias, labels, path, weights, **kw):
    """(fastalign stats, grads) and (float64 reference stats, grads) for loss = sum_k w_k * stat_k."""
    backend, chunk = path
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(h, w, labels, bias=b, entropy=True, sum_p2=True, argmax=True,
                                   backend=backend, chunk=chunk, **kw)
    (st.logprobs * weights[0] + st.entropy * weights[1] + st.sum_p2 * weights[2]).sum().backward()
    hr = hidden.detach().double().requires_grad_(True)
    wr = weight.detach().double().requires_grad_(True)
    br = None if bias is None else bias.detach().double().requires_grad_(True)
    ref = reference.linear_logprobs(hr, wr, labels, bias=br, dtype=torch.float64, **kw)
    (ref[0] * weights[0] + ref[1] * weights[1] + ref[2] * weights[2]).sum().backward()
    grads = (h.grad, w.grad, None if b is None else b.grad)
    ref_grads = (hr.grad, wr.grad, None if br is None else br.grad)
    return st, grads, ref, ref_grads


def check(st, grads, ref, ref_grads, tol, gtol, argmax=True):
    for a, e, name in zip(st[:3], ref[:3], ("logprobs", "entropy", "sum_p2")):
        assert a.dtype == torch.float32
        assert_close(a, e, atol=tol, rtol=tol, what=name)
    if argmax:
        assert torch.equal(st.argmax, ref[3])
    for a, e, name in zip(grads, ref_grads, ("d hidden", "d weight", "d bias")):
        if e is not None:
            assert_close(a, e, atol=gtol, rtol=gtol, what=name)


PIPELINES = {
    "plain": {},
    "temperature": dict(temperature=0.7),
    "softcap": dict(softcap=4.0, temperature=1.3),
    "scale": dict(logit_scale=0.5),
    "all": dict(logit_scale=1.7, softcap=3.0, temperature=0.8),
}


@pytest.mark.parametrize("pipe", list(PIPELINES))
def test_fp32_forward_and_grads(path, pipe):
    hidden, weight, bias, labels = make_inputs()
    w = torch.randn(3, N, dtype=torch.float64)
    st, grads, ref, ref_grads = run_both(hidden, weight, bias, labels, path, w, **PIPELINES[pipe])
    check(st, grads, ref, ref_grads, tol=2e-5, gtol=2e-5)
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32


def test_bf16_forward_and_grads(path):
    hidden, weight, bias, labels = make_inputs(dtype=torch.bfloat16)
    w = torch.randn(3, N, dtype=torch.float64)
    st, grads, ref, ref_grads = run_both(hidden, weight, bias, labels, path, w, softcap=5.0, temperature=0.9)
    # fp32 math on bf16 inputs: the statistics are as exact as in fp32; the
    # gradients are rounded to bf16 once at the end (rtol 2^-8).
    check(st, grads, ref, ref_grads, tol=5e-5, gtol=1e-2, argmax=False)
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.bfloat16
    assert grads[2].dtype == torch.bfloat16


def test_no_bias_3d_hidden(path):
    hidden, weight, _, labels = make_inputs(n=2 * 9, bias=False)
    w = torch.randn(3, 2, 9, dtype=torch.float64)
    st, grads, ref, ref_grads = run_both(hidden.view(2, 9, H), weight, None, labels.view(2, 9), path, w)
    assert st.logprobs.shape == (2, 9)
    check(st, grads, ref, ref_grads, tol=2e-5, gtol=2e-5)


def test_ignore_index_rows(path):
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs()
    labels[labels == -100] = 1
    labels[2:6] = -7
    h = hidden.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(h, weight, labels, bias=bias, ignore_index=-7, entropy=True, sum_p2=True,
                                   backend=backend, chunk=chunk)
    (st.logprobs + st.entropy + st.sum_p2).sum().backward()
    for t in st[:3]:
        assert torch.count_nonzero(t[2:6]) == 0
    assert torch.count_nonzero(h.grad[2:6]) == 0
    assert torch.count_nonzero(h.grad[6]) > 0
    ref = reference.linear_logprobs(hidden.double(), weight.double(), labels, bias=bias.double(),
                                    ignore_index=-7, dtype=torch.float64)
    assert_close(st.logprobs, ref[0], atol=2e-5, what="logprobs")


def test_ignore_index_minus_one(path):
    """ignore_index = -1 must not collide with the 'label lives in another vocabulary piece' marker."""
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs()
    labels[labels == -100] = -1
    st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=-1, entropy=True,
                                   backend=backend, chunk=chunk)
    ref = reference.linear_logprobs(hidden.double(), weight.double(), labels, bias=bias.double(),
                                    ignore_index=-1, dtype=torch.float64)
    assert_close(st.logprobs, ref[0], atol=2e-5, what="logprobs")
    assert_close(st.entropy, ref[1], atol=2e-5, what="entropy")


@pytest.mark.parametrize("used", ["logprobs", "entropy", "sum_p2"])
def test_partly_used_outputs(path, used):
    hidden, weight, bias, labels = make_inputs(seed=3)
    w = torch.zeros(3, N, dtype=torch.float64)
    w[("logprobs", "entropy", "sum_p2").index(used)] = 1.0
    st, grads, ref, ref_grads = run_both(hidden, weight, bias, labels, path, w)
    check(st, grads, ref, ref_grads, tol=2e-5, gtol=2e-5)


def test_only_logprobs_requested(path):
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs()
    h = hidden.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(h, weight, labels, backend=backend, chunk=chunk)
    assert st.entropy is None and st.sum_p2 is None and st.argmax is None
    st.logprobs.sum().backward()
    hr = hidden.double().requires_grad_(True)
    reference.linear_logprobs(hr, weight.double(), labels, dtype=torch.float64)[0].sum().backward()
    assert_close(h.grad, hr.grad, atol=2e-5, rtol=2e-5, what="d hidden")


def test_tied_weights_accumulate(path):
    """The lm_head is also the input embedding: its gradient is the sum of both uses."""
    backend, chunk = path
    g = torch.Generator().manual_seed(5)
    emb = (torch.randn(V, H, generator=g) * 0.2)
    ids = torch.randint(0, V, (N,), generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    proj = torch.randn(H, H, generator=g) / H ** 0.5

    def loss(w, stats):
        hidden = torch.tanh(w[ids] @ proj.to(w.dtype))
        return stats(hidden, w)

    w = emb.clone().requires_grad_(True)
    out = loss(w, lambda h, ww: fastalign.linear_logprobs(h, ww, labels, entropy=True, backend=backend, chunk=chunk))
    (out.logprobs.sum() - 0.3 * out.entropy.sum()).backward()
    wr = emb.double().requires_grad_(True)
    ref = loss(wr, lambda h, ww: reference.linear_logprobs(h, ww, labels, dtype=torch.float64))
    (ref[0].sum() - 0.3 * ref[1].sum()).backward()
    assert_close(w.grad, wr.grad, atol=2e-5, rtol=2e-5, what="d tied weight")
    assert torch.count_nonzero(w.grad[ids]) > 0


def test_out_of_range_labels_give_nan(path):
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs()
    labels[3], labels[4] = V, -5
    st = fastalign.linear_logprobs(hidden, weight, labels, entropy=True, backend=backend, chunk=chunk)
    assert torch.isnan(st.logprobs[3]) and torch.isnan(st.logprobs[4])
    assert torch.isfinite(st.entropy).all()


def test_nan_and_massless_rows_are_nan_rows(path):
    """A NaN in a hidden row, or a row whose logits are all -inf, is a NaN row in every statistic, as log_softmax
    of the full logits gives, however the vocabulary is cut into pieces; the other rows are unaffected."""
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs()
    labels[:2] = torch.tensor([5, 6])
    hidden[0, 3] = float("nan")
    st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, entropy=True, sum_p2=True, backend=backend,
                                   chunk=chunk)
    ref = reference.linear_logprobs(hidden.double(), weight.double(), labels, bias=bias.double(), dtype=torch.float64)
    assert torch.isnan(st.logprobs[0]) and torch.isnan(st.entropy[0]) and torch.isnan(st.sum_p2[0])
    for a, e in zip(st[:3], ref[:3]):
        assert_close(a[1:], e[1:], atol=2e-5, rtol=2e-5)
    massless = fastalign.linear_logprobs(hidden[2:4], weight, labels[2:4], bias=torch.full((V,), -float("inf")),
                                         entropy=True, sum_p2=True, backend=backend, chunk=chunk)
    for t in massless[:3]:
        assert torch.isnan(t).all()


def test_argmax_passes_over_a_nan_row(path):
    """argmax=True with a NaN hidden row (even an ignored prompt row) made the Triton kernel's argmax fail on an
    all-NaN tile; the NaN row's argmax is 0 and every other row's is unchanged, on every backend."""
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs()
    labels[0] = -100
    hidden[0] = float("nan")
    st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, argmax=True, backend=backend, chunk=chunk)
    z = hidden[1:].double() @ weight.double().T + bias.double()
    assert st.argmax[0].item() == 0 and torch.equal(st.argmax[1:], z.argmax(-1))


def test_extreme_logits(path):
    """Huge logits (scale 1e3) stay finite: every running value is relative to the running max."""
    hidden, weight, bias, labels = make_inputs(seed=7)
    w = torch.randn(3, N, dtype=torch.float64)
    st, grads, ref, ref_grads = run_both(hidden, weight, bias, labels, path, w, logit_scale=1e3)
    for t in st[:3]:
        assert torch.isfinite(t[labels != -100]).all()
    assert_close(st.logprobs, ref[0], atol=2e-2, rtol=1e-5, what="logprobs")
    assert_close(st.entropy, ref[1], atol=1e-3, what="entropy")


def test_empty_batch(path):
    backend, chunk = path
    h = torch.zeros(0, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    st = fastalign.linear_logprobs(h, w, torch.zeros(0, dtype=torch.long), entropy=True, backend=backend, chunk=chunk)
    (st.logprobs.sum() + st.entropy.sum()).backward()
    assert h.grad.shape == (0, H) and torch.count_nonzero(w.grad) == 0


def test_deterministic(path):
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs(dtype=torch.bfloat16)
    outs = []
    for _ in range(2):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        st = fastalign.linear_logprobs(h, w, labels, bias=bias, entropy=True, sum_p2=True, backend=backend, chunk=chunk)
        (st.logprobs + st.entropy).sum().backward()
        outs.append((st.logprobs, st.entropy, st.sum_p2, h.grad, w.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_chunks_do_not_change_results():
    hidden, weight, bias, labels = make_inputs()
    full = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, entropy=True, sum_p2=True, argmax=True,
                                     backend="cpp", chunk=(N, V))
    for chunk in [(1, 1), (3, 200), (16, 202), (17, 7)]:
        st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, entropy=True, sum_p2=True, argmax=True,
                                       backend="cpp", chunk=chunk)
        for a, b in zip(full[:3], st[:3]):
            assert_close(a, b, atol=3e-6, rtol=1e-6, what=f"chunk {chunk}")
        assert torch.equal(full.argmax, st.argmax)


def test_argmax_ties_take_lowest_index():
    hidden = torch.ones(3, 4)
    weight = torch.zeros(50, 4)
    weight[[7, 20, 45]] = 1.0  # three equal maxima, in different vocabulary chunks
    st = fastalign.linear_logprobs(hidden, weight, torch.zeros(3, dtype=torch.long), argmax=True, backend="cpp",
                                   chunk=(2, 10))
    assert st.argmax.tolist() == [7, 7, 7]


def merge_stats(lse, ent, sp2):
    """Per-piece statistics ``[K, N]`` (log-sum-exp, entropy, sum p^2 of disjoint vocabulary pieces) merged into
    ``[N]`` by :func:`merge_pieces`, the kernels' merge."""
    M, log_S, out_ent, out_sp2, _ = merge_pieces(lse, torch.zeros_like(lse), ent, sp2)
    return M + log_S, out_ent, out_sp2


def test_merge_stats_matches_full_row():
    z = torch.randn(5, 60, dtype=torch.float64) * 3
    z[1, :30] = float("-inf")  # a piece with no mass
    pieces = z.split([30, 17, 13], dim=1)
    lse_k = torch.stack([torch.logsumexp(p, 1) for p in pieces])
    ent_k = torch.stack([-(torch.softmax(p, 1) * torch.log_softmax(p, 1)).nan_to_num().sum(1) for p in pieces])
    sp2_k = torch.stack([(torch.softmax(p, 1) ** 2).sum(1) for p in pieces])
    lse, ent, sp2 = merge_stats(lse_k, ent_k.nan_to_num(), sp2_k.nan_to_num())
    p = torch.softmax(z, 1)
    assert_close(lse, torch.logsumexp(z, 1), atol=1e-12, what="lse")
    assert_close(ent, -(p * torch.log_softmax(z, 1)).nan_to_num().sum(1), atol=1e-12, what="entropy")
    assert_close(sp2, (p * p).sum(1), atol=1e-12, what="sum_p2")


def test_merged_entropy_of_a_near_one_hot_row_is_not_negative():
    """A piece holding nearly all the mass whose own fp32 entropy rounds just below 0 (as the kernels' may at a
    near one-hot row), beside a piece of almost none: the merged entropy is 0, not a negative number (two vocabulary
    shards gave -3e-8 at logits of 1e4 and T = 0.05); NaN stays NaN."""
    lse_k = torch.tensor([[0.0, 0.0], [-30.0, float("nan")]])
    ent_k = torch.tensor([[-1e-10, 0.0], [0.0, 0.0]])
    _, ent, _ = merge_stats(lse_k, ent_k, None)
    assert ent[0] == 0.0 and torch.isnan(ent[1]), ent.tolist()


def test_merge_stats_of_a_row_with_no_mass():
    """A row whose pieces all have no mass (every logit -inf) merges to lse = -inf, as the full row's
    logsumexp, not NaN; a row beside it with one massless piece keeps its exact lse."""
    z = torch.randn(2, 12, dtype=torch.float64)
    z[0] = float("-inf")
    z[1, :5] = float("-inf")
    lse_k = torch.stack([torch.logsumexp(p, 1) for p in z.split([5, 7], dim=1)])
    lse, _, _ = merge_stats(lse_k, None, None)
    want = torch.logsumexp(z, 1)
    assert want[0] == float("-inf") and lse[0] == float("-inf"), lse.tolist()
    assert_close(lse[1:], want[1:], atol=1e-12, what="lse")


def test_chunk_shape_bounds_memory():
    from fastalign.linear import chunk_shape

    nc, vc = chunk_shape(4096, 152064, "cpp", 32)
    assert nc * vc * 4 <= 32 * 2 ** 20 and vc <= 16384 and -(-152064 // vc) * vc - 152064 < 16
    nc, vc = chunk_shape(8192, 131072, "triton", 64)
    assert vc == 131072 and nc * vc * 4 <= 64 * 2 ** 20


def test_a_tiny_chunk_budget_keeps_vocabulary_pieces_of_16(monkeypatch):
    """A budget below 16 x 16 fp32 logits: the C++ path still splits the vocabulary in near-equal pieces of at
    least 16 ids (never an empty piece) and one token per chunk, and the statistics match the float64 reference."""
    from fastalign.linear import chunk_shape

    for mib in (1e-5, 1e-4):
        nc, vc = chunk_shape(N, V, "cpp", mib)
        pieces = -(-V // vc)
        assert nc == 1 and 16 <= vc <= V and pieces * vc - V < pieces, (mib, nc, vc)
    monkeypatch.setenv("FASTALIGN_LINEAR_CHUNK_MIB", "1e-5")
    hidden, weight, bias, labels = make_inputs()
    w = torch.randn(3, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    st, grads, ref, ref_grads = run_both(hidden, weight, bias, labels, ("cpp", None), w)
    check(st, grads, ref, ref_grads, tol=2e-5, gtol=2e-5)


def _op_args(backend, chunk=(5, 37), low_rank=False, mean_logit=False):
    hidden, weight, bias, labels = make_inputs()
    a, lw = (torch.randn(N, 3), torch.randn(V, 3) * 0.3) if low_rank else (None, None)
    return (hidden, weight, bias, a, lw, labels, 1.3, 4.0, 1.0 / 0.9, -100, True, True, True, backend, *chunk, 0.0,
            mean_logit)


@pytest.mark.parametrize("low_rank,mean_logit", [(False, False), (True, False), (False, True)],
                         ids=["plain", "low_rank", "mean_logit"])
def test_custom_ops_pass_opcheck(cpu_backend, low_rank, mean_logit):
    args = _op_args(cpu_backend, low_rank=low_rank, mean_logit=mean_logit)
    torch.library.opcheck(linear_stats, args, test_utils=("test_schema", "test_faketensor"))
    lp, ent, sp2, _amax, _val, lse, mean, log_c = linear_stats(*args)
    assert mean.numel() == (N if mean_logit else 0)
    hidden, weight, bias, a, lw, labels = args[:6]
    g = torch.randn(N)
    bargs = (g, g, g, hidden, weight, bias, a, lw, labels, lse, ent, sp2, 1.3, 4.0, 1.0 / 0.9, -100, cpu_backend,
             5, 37, 0.0, True, True, True, low_rank, log_c, g if mean_logit else None)
    torch.library.opcheck(linear_stats_backward, bargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("low_rank,mean_logit", [(False, False), (True, False), (False, True)],
                         ids=["plain", "low_rank", "mean_logit"])
def test_autograd_registration_passes_opcheck(low_rank, mean_logit):
    args = list(_op_args("cpp", low_rank=low_rank, mean_logit=mean_logit))
    for i in range(5 if low_rank else 3):
        args[i] = args[i].clone().requires_grad_(True)
    torch.library.opcheck(linear_stats, tuple(args), test_utils=("test_autograd_registration",))


def test_torch_compile_fullgraph_no_graph_break():
    hidden, weight, bias, labels = make_inputs()

    def step(h, w, b):
        st = fastalign.linear_logprobs(h, w, labels, bias=b, entropy=True, temperature=0.9, softcap=5.0)
        return (st.logprobs - 0.01 * st.entropy).sum()

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss_ref = step(*ref_leaves)
    loss_ref.backward()
    assert_close(loss, loss_ref, atol=1e-5, what="compiled loss")
    for a, b in zip(leaves, ref_leaves):
        assert_close(a.grad, b.grad, atol=1e-7, what="compiled grad")


@pytest.mark.parametrize(
    "args, kw, err, match",
    [
        ((torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long)), {}, ValueError,
         r"weight must have shape \(V, 8\)"),
        ((torch.randn(4, 8), torch.randn(10, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long)), {},
         TypeError, "weight must be float32"),
        ((torch.randn(4, 8), torch.randn(10, 8).bfloat16(), torch.zeros(4, dtype=torch.long)), {}, TypeError,
         "weight must have the dtype of hidden"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long)), {}, ValueError,
         r"labels must have shape \(4,\)"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)), {}, TypeError, "labels must be an int64"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), dict(bias=torch.randn(9)),
         ValueError, r"bias must have shape \(10,\)"),
        ((torch.randn(4, 8), torch.randn(80), torch.zeros(4, dtype=torch.long)), {}, ValueError,
         "weight must have 2 dimension"),
        (([1.0], torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), {}, TypeError, "hidden must be a torch.Tensor"),
        ((torch.randn(4, 8), torch.randn(0, 8), torch.zeros(4, dtype=torch.long)), {}, ValueError, "non-empty"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), dict(temperature=0.0),
         ValueError, "temperature must be > 0"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), dict(softcap=-1.0),
         ValueError, "softcap must be > 0"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), dict(logit_scale=float("inf")),
         ValueError, "logit_scale must be finite"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), dict(chunk=(0, 4)),
         ValueError, "chunk must be"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), dict(backend="cuda"),
         ValueError, "backend 'cuda' needs CUDA tensors"),
        ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), dict(mean_logit="yes"),
         TypeError, "mean_logit"),
    ],
)
def test_bad_input(args, kw, err, match):
    with pytest.raises(err, match=match):
        fastalign.linear_logprobs(*args, **kw)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_argmax_ties_take_lowest_index_across_pieces(backend):
    hidden = torch.ones(3, 32)
    weight = torch.zeros(300, 32)
    weight[[7, 140, 290]] = 1.0  # equal maxima in different vocabulary chunks / splits
    st = fastalign.linear_logprobs(hidden, weight, torch.zeros(3, dtype=torch.long), argmax=True, backend=backend,
                                   chunk=(2, 64))
    assert st.argmax.tolist() == [7, 7, 7]


def test_triton_grad_skip_threshold_error():
    """Skipping backward tiles whose |d logit| are all below a threshold: exact at 0, measured error above.

    Labels in the first 64 ids (frequent tokens), so most 16 x 64 tiles carry no
    label term. Measured here (relative L2 error of d hidden / d weight):
    threshold 1e-2 -> 0 (no tile that small), 5e-2 -> 3.0% / 2.7%.
    """
    hidden, weight, bias, labels = make_inputs(n=32, v=512, seed=11)
    labels = labels % 64
    grads = {}
    for thr in (0.0, 1e-2, 5e-2):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        st = fastalign.linear_logprobs(h, w, labels, bias=bias, entropy=True, backend="triton",
                                       grad_skip_threshold=thr)
        (st.logprobs - 0.1 * st.entropy).sum().backward()
        grads[thr] = (h.grad, w.grad)
    rel = {thr: [float((a - e).norm() / e.norm()) for a, e in zip(grads[thr], grads[0.0])] for thr in grads}
    assert rel[1e-2] == [0.0, 0.0]
    assert all(1e-3 < r < 0.1 for r in rel[5e-2]), rel
    # skipped tiles are exactly the zeroed ones: the exact gradient there is below the threshold
    hr = hidden.double().requires_grad_(True)
    ref = reference.linear_logprobs(hr, weight.double(), labels, bias=bias.double(), dtype=torch.float64)
    (ref[0] - 0.1 * ref[1]).sum().backward()
    assert_close(grads[0.0][0], hr.grad, atol=2e-5, rtol=2e-5, what="d hidden (no skipping)")


def test_triton_grad_skip_keeps_a_tile_with_a_nan_gradient():
    """A NaN upstream gradient reaches d hidden and d weight under ``grad_skip_threshold`` as on the cpp
    backward (which skips nothing): a tile holding a NaN is kept, whatever its other entries' size."""
    hidden, weight, bias, labels = make_inputs(n=32, v=512, seed=12)
    g = torch.full((32,), 1e-6)
    g[5] = float("nan")
    grads = {}
    for backend, thr in (("cpp", 0.0), ("triton", 1.0)):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        st = fastalign.linear_logprobs(h, w, labels, bias=bias, backend=backend, grad_skip_threshold=thr)
        (st.logprobs * g).sum().backward()
        grads[backend] = (h.grad, w.grad)
    for got, want in zip(grads["triton"], grads["cpp"]):
        assert want.isnan().any()
        assert torch.equal(got.isnan(), want.isnan())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vocab_parallel_worker(rank, world, port, backend, out_dir, temperature=0.9):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with rank_body():
        torch.set_num_threads(1)
        hidden, weight, bias, labels = make_inputs(n=N, v=2 * 101)
        labels[5] = 101  # first id of rank 1's shard; labels[-1] is the last id of the vocabulary
        labels[6] = 100  # last id of rank 0's shard
        vr = weight.shape[0] // world
        h = hidden.clone().requires_grad_(True)
        w = weight[rank * vr:(rank + 1) * vr].clone().requires_grad_(True)
        b = bias[rank * vr:(rank + 1) * vr].clone().requires_grad_(True)
        st = fastalign.linear_logprobs(h, w, labels, bias=b, entropy=True, sum_p2=True, argmax=True, softcap=4.0,
                                       temperature=temperature, vocab_group=dist.group.WORLD, backend=backend,
                                       chunk=(5, 37))
        gw = torch.linspace(-1, 1, N)
        (st.logprobs * gw + st.entropy * 0.3 - st.sum_p2).sum().backward()
        torch.save({"stats": [None if t is None else t.detach() for t in st], "dh": h.grad, "dw": w.grad,
                    "db": b.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("backend,temperature", [("cpp", 0.9), ("triton", 0.9), ("cpp", 0.05), ("triton", 0.05)],
                         ids=["cpp", "triton", "cpp-renormalised", "triton-renormalised"])
def test_vocab_parallel_two_ranks_gloo(tmp_path, backend, temperature):
    """Two vocabulary shards equal one rank; at temperature 0.05 (|lse| >= 32) backward renormalises
    each row by its probability mass over the whole vocabulary, summed across the shards."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_vocab_parallel_worker, args=(world, _free_port(), backend, str(tmp_path), temperature), nprocs=world,
             join=True)
    hidden, weight, bias, labels = make_inputs(n=N, v=2 * 101)
    labels[5], labels[6] = 101, 100
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(h, w, labels, bias=b, entropy=True, sum_p2=True, argmax=True, softcap=4.0,
                                   temperature=temperature, backend="cpp")
    gw = torch.linspace(-1, 1, N)
    (st.logprobs * gw + st.entropy * 0.3 - st.sum_p2).sum().backward()
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    vr = weight.shape[0] // world
    # the gradients scale with 1 / T and so does the fp32 rounding of two kernels' logits; a shard
    # renormalised by its own mass only is off by tens of percent
    gtol = 2e-5 * 0.9 / temperature
    for r, out in enumerate(res):
        for a, e, name in zip(out["stats"][:3], st[:3], ("logprobs", "entropy", "sum_p2")):
            assert_close(a, e, atol=2e-5, rtol=1e-5, what=f"rank {r} {name}")
        assert torch.equal(out["stats"][3], st.argmax)
        assert_close(out["dh"], h.grad, atol=gtol, rtol=1e-5, what=f"rank {r} d hidden")
        assert_close(out["dw"], w.grad[r * vr:(r + 1) * vr], atol=gtol, rtol=1e-5, what=f"rank {r} d weight shard")
        assert_close(out["db"], b.grad[r * vr:(r + 1) * vr], atol=gtol, rtol=1e-5, what=f"rank {r} d bias shard")


@pytest.mark.parametrize("chunk", [(5, 37), None], ids=["chunked", "auto"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cpu_ignored_rows_skip_the_vocabulary(chunk, softcap):
    """On CPU only labelled rows go through the vocabulary: with half the rows ignored, statistics and
    gradients equal (to fp32 rounding) the computation over every row whose ignored rows are then zeroed
    (here: every row given a real label, the ignored ones masked out of the loss), and ignored rows get
    exactly 0."""
    n = 40
    hidden, weight, bias, labels = make_inputs(n=n, ignore_frac=0.0, seed=3)
    ignored = torch.zeros(n, dtype=torch.bool)
    ignored[torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 2]] = True
    sparse = torch.where(ignored, -100, labels)
    kw = dict(softcap=softcap, temperature=0.7, backend="cpp", chunk=chunk)
    keep = (~ignored).float()

    def run(y, mask):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        st = fastalign.linear_logprobs(h, w, y, bias=b, entropy=True, sum_p2=True, **kw)
        ((st.logprobs + 0.3 * st.entropy - 0.5 * st.sum_p2) * mask).sum().backward()
        return st, (h.grad, w.grad, b.grad)

    st, grads = run(sparse, torch.ones(n))
    full, full_grads = run(labels, keep)
    for a, e, name in zip(st[:3], full[:3], ("logprobs", "entropy", "sum_p2")):
        assert torch.equal(a[ignored], torch.zeros(n // 2)), name
        # the same per-row arithmetic; BLAS may block a product of fewer rows differently (fp32 rounding)
        assert_close(a[~ignored], e[~ignored], atol=1e-5, rtol=1e-6, what=name)
    assert torch.equal(grads[0][ignored], torch.zeros(n // 2, hidden.shape[1]))
    assert_close(grads[0][~ignored], full_grads[0][~ignored], atol=1e-6, rtol=1e-5, what="dhidden")
    for a, e, name in zip(grads[1:], full_grads[1:], ("weight", "bias")):
        assert_close(a, e, atol=5e-6, rtol=1e-5, what=f"d{name}")  # fp32 sums over rows in another order
    # and against the float64 reference
    hr, wr, br = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
    ref = reference.linear_logprobs(hr, wr, sparse, bias=br, dtype=torch.float64, softcap=softcap, temperature=0.7)
    (ref[0] + 0.3 * ref[1] - 0.5 * ref[2]).sum().backward()
    assert_close(st.logprobs, ref[0], atol=1e-5, rtol=1e-5, what="logprobs")
    for a, e, name in zip(grads, (hr.grad, wr.grad, br.grad), ("hidden", "weight", "bias")):
        assert_close(a, e, atol=1e-4, rtol=1e-4, what=f"d{name}")


def test_cpu_all_rows_ignored():
    hidden, weight, bias, labels = make_inputs(n=6)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(h, w, torch.full_like(labels, -100), entropy=True, backend="cpp")
    assert torch.equal(st.logprobs, torch.zeros(6)) and torch.equal(st.entropy, torch.zeros(6))
    (st.logprobs + st.entropy).sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_cpu_only_labelled_rows_reach_the_vocabulary(monkeypatch):
    from fastalign.ops import linear_cpu as ops

    seen = []
    for name, rows_arg in (("forward", 4), ("backward", 3)):  # the labels of forward, the hidden states of backward
        fn = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, fn=fn, i=rows_arg, **k: seen.append(a[i].shape[0]) or fn(*a, **k))
    hidden, weight, bias, labels = make_inputs(n=12, ignore_frac=0.0)
    labels[::3] = -100
    h = hidden.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(h, weight, labels, bias=bias, backend="cpp")
    st.logprobs.sum().backward()
    assert seen == [8, 8]  # forward and backward each see the 8 labelled rows
    seen.clear()
    fastalign.linear_logprobs(hidden, weight, labels, bias=bias, argmax=True, backend="cpp")
    assert seen == [12]  # argmax is defined on ignored rows too: every row


def test_prompt_first_rows_whole_ignored_blocks(path):
    """Prompt tokens first (a whole block of ignored rows, which the Triton kernels skip in forward
    and backward), then responses: statistics and gradients equal the float64 reference."""
    n = 40
    hidden, weight, bias, labels = make_inputs(n=n, ignore_frac=0.0, seed=5)
    labels[:20] = -100
    st, grads, ref, ref_grads = run_both(hidden, weight, bias, labels, path, (1.0, -0.5, 0.25))
    check(st, grads, ref, ref_grads, tol=2e-5, gtol=2e-5, argmax=False)
    assert torch.count_nonzero(grads[0][:20]) == 0 and torch.count_nonzero(st.logprobs[:20]) == 0


@pytest.mark.parametrize("offset,temperature", [(1e4, 1.0), (200.0, 1.0 / 64)])
def test_gradients_renormalised_at_large_lse(path, offset, temperature):
    """|lse| >= 32: backward renormalises each row by its mass over the vocabulary, so the saved fp32
    lse (off by ~ulp(lse) / 2, 5e-4 of every p at 1e4) does not reach the gradients. Integer hidden
    states and weights make every path's fp32 logits the same numbers, so float64 on those logits is
    the exact answer."""
    backend, chunk = path
    g = torch.Generator().manual_seed(12)
    n, h_dim, v = 24, 4, 80
    hidden = torch.randint(-2, 3, (n, h_dim), generator=g).float().requires_grad_()
    weight = torch.randint(-2, 3, (v, h_dim), generator=g).float().requires_grad_()
    bias = (offset + torch.randn(v, generator=g) * 2.0 * temperature).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:5] = -100
    st = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, entropy=True,
                                   backend=backend, chunk=chunk)
    (st.logprobs.sum() + 0.3 * st.entropy.sum()).backward()
    z = torch.addmm(bias.detach(), hidden.detach(), weight.detach().T).double().requires_grad_()
    logp = torch.log_softmax(z / temperature, -1)
    keep = (labels != -100).double()
    lp = logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(1)
    ((lp * keep).sum() - 0.3 * ((logp.exp() * logp).sum(-1) * keep).sum()).backward()
    dz = z.grad
    tol = 2e-5 / temperature
    assert_close(bias.grad, dz.sum(0), atol=tol, rtol=1e-5, what="d bias")
    assert_close(hidden.grad, dz @ weight.detach().double(), atol=tol, rtol=1e-5, what="d hidden")
    assert_close(weight.grad, dz.T @ hidden.detach().double(), atol=tol, rtol=1e-5, what="d weight")


def test_gradients_renormalised_from_lse_32(path):
    """Renormalisation starts at |lse| = 32, where the saved fp32 lse is already off by up to 2^-20: with lse
    about 45-55 (an ulp of 3.8e-6) the gradients stay at their own fp32 rounding (~8e-7 here), where the
    unrenormalised rows would be off by 2-5e-6. Integer hidden states and weights: float64 on the fp32
    logits is the exact answer."""
    backend, chunk = path
    g = torch.Generator().manual_seed(12)
    n, h_dim, v = 24, 4, 80
    hidden = torch.randint(-2, 3, (n, h_dim), generator=g).float().requires_grad_()
    weight = torch.randint(-2, 3, (v, h_dim), generator=g).float().requires_grad_()
    bias = (40.0 + torch.randn(v, generator=g) * 2.0).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    fastalign.linear_logprobs(hidden, weight, labels, bias=bias, backend=backend, chunk=chunk).logprobs.sum().backward()
    z = torch.addmm(bias.detach(), hidden.detach(), weight.detach().T).double().requires_grad_()
    torch.log_softmax(z, -1).gather(-1, labels[:, None]).sum().backward()
    dz = z.grad
    assert_close(bias.grad, dz.sum(0), atol=2e-6, rtol=0, what="d bias")
    assert_close(hidden.grad, dz @ weight.detach().double(), atol=2e-6, rtol=0, what="d hidden")
    assert_close(weight.grad, dz.T @ hidden.detach().double(), atol=2e-6, rtol=0, what="d weight")


def _far_and_near_rows(seed=12, n=24, h_dim=4, v=80):
    """Integer hidden states and weights (exact fp32 logits) whose last column shifts every other row's logits by
    40: rows with |lse| about 45 beside rows with |lse| under 32; two rows ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (n, h_dim), generator=g).float()
    weight = torch.randint(-2, 3, (v, h_dim), generator=g).float()
    hidden[:, -1] = torch.tensor([40.0, 0.0]).repeat(n // 2)
    weight[:, -1] = 1.0
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[3, 4]] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_forward_saves_the_rounding_of_its_lse(path, temperature):
    """The forward's ``log_c`` output is ``log sum_j exp(z_j / T - lse)`` for its own saved fp32 lse at the labelled
    rows with |lse| >= 32 (float64 on the exact logits; the rounding of log S apart), and exactly 0 elsewhere: the
    correction the backward applies without another pass over the logits."""
    backend, chunk = path
    hidden, weight, labels = _far_and_near_rows()
    n, v = hidden.shape[0], weight.shape[0]
    nc, vc = chunk or (n, v)
    out = linear_stats(hidden, weight, None, None, None, labels, 1.0, 0.0, 1.0 / temperature, -100, False, False,
                       False, backend, nc, vc, 0.0)
    lse, log_c = out[5], out[7]
    z = (hidden.double() @ weight.double().T) / temperature
    want = torch.logsumexp(z - lse.double()[:, None], -1)
    far = (lse.abs() >= 32) & (labels != -100)
    assert far.sum() == 11 and (~far & (labels != -100)).sum() == 11
    assert torch.equal(log_c[~far], torch.zeros(int((~far).sum())))
    assert want[far].abs().max() > 1.5e-6  # the saved lse is off by that much: the correction is not 0
    # to the rounding of log S (its fp32 exponentials and sums)
    assert_close(log_c[far], want[far], atol=5e-7, rtol=0, what="log c")


def test_backward_makes_no_other_pass_over_the_logits(path, monkeypatch):
    """Rows with |lse| >= 32 cost the backward nothing more: the C++ path forms each chunk's logits once in the
    backward (as in the forward), the Triton path launches no forward kernel in it."""
    from fastalign.kernels import linear_stats as kernels
    from fastalign.ops import linear_cpu

    backend, chunk = path
    passes = []
    for module, name in ((linear_cpu, "chunk_logits"), (kernels, "_forward_parts")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name, **k: passes.append(name) or fn(*a, **k))
    hidden, weight, labels = _far_and_near_rows()
    h = hidden.clone().requires_grad_(True)
    st = fastalign.linear_logprobs(h, weight, labels, entropy=True, backend=backend, chunk=chunk)
    forward = list(passes)
    passes.clear()
    (st.logprobs + st.entropy).sum().backward()
    assert forward and passes == ([] if backend == "triton" else forward)


@pytest.mark.parametrize("temperature", [0.7, 0.05, 1e-3])
def test_small_temperature_gradients_keep_fp32_precision(cpu_backend, temperature):
    """The C++ backward formed the far rows' mass from a rounded z / T and the row kernel from an unrounded one,
    so the renormalisation did not cancel the rounding of the saved lse: d(hidden) off by 1.7e-3 (relative) at
    T = 1e-3, 2.9e-5 at T = 0.05."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 8, 16, 101
    h, w = torch.randn(N, H, generator=g) * 3, torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    hr = h.double().requires_grad_(True)
    torch.log_softmax((hr @ w.double().T) / temperature, -1).gather(-1, y[:, None]).sum().backward()
    hv = h.clone().requires_grad_(True)
    # C++: vocabulary pieces of 32 (the far rows' mass formed per piece); Triton: its own tiles, the same in the
    # forward and the backward (at T = 1e-3 the logits' fp32 rounding is scaled by 1e3: tiles that change between
    # the passes would change z / T by more than the tolerance)
    chunk = (4, 32) if cpu_backend == "cpp" else None
    fastalign.linear_logprobs(hv, w, y, temperature=temperature, backend=cpu_backend,
                              chunk=chunk).logprobs.sum().backward()
    err = float((hv.grad.double() - hr.grad).abs().max() / hr.grad.abs().max())
    assert err < 5e-6, err


def test_large_softcap_keeps_fp32_precision(cpu_backend):
    """Triton formed tanh as 1 - 2 / (e^{2v} + 1), which cancels for small v: every logit off by cap * 6e-8
    (6.8e-4 in the log-probs at cap = 1e4)."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 8, generator=g), torch.randn(29, 8, generator=g)
    y = torch.randint(0, 29, (6,), generator=g)
    for cap in (30.0, 1e4, 1e6):
        got = fastalign.linear_logprobs(h, w, y, softcap=cap, backend=cpu_backend).logprobs
        ref = reference.linear_logprobs(h.double(), w.double(), y, dtype=torch.float64, softcap=cap)[0]
        assert_close(got, ref, atol=3e-6, rtol=1e-6, what=f"softcap {cap}")


def _reference_mean(hidden, weight, bias, labels, low_rank=None, **pipe):
    """(1/V) sum_j z_j of the float64 logits before the temperature, 0 at the ignored rows."""
    u = hidden @ weight.T
    if low_rank is not None:
        u = u + low_rank[0] @ low_rank[1].T
    z = reference.linear_logits(u, torch.eye(u.shape[-1], dtype=u.dtype), bias=bias, softcap=pipe.get("softcap"),
                                logit_scale=pipe.get("logit_scale", 1.0), dtype=torch.float64)
    return torch.where(labels != pipe.get("ignore_index", -100), z.mean(-1), 0.0)


@pytest.mark.parametrize("pipe", list(PIPELINES))
@pytest.mark.parametrize("used", ["logprobs+mean", "mean"])
def test_mean_logit_forward_and_grads(path, pipe, used):
    """mean_logit = (1/V) sum_j z_j (before the temperature) from the same pass, and its gradient in the same
    backward, alone or beside the log-probs', against float64 autograd through the full logits."""
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs(seed=5)
    g_lp, g_mean = torch.randn(2, N, dtype=torch.float64) * torch.tensor([[float(used != "mean")], [1.0]])
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    st = fastalign.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], mean_logit=True, backend=backend,
                                   chunk=chunk, **PIPELINES[pipe])
    (st.mean_logit * g_mean).sum().backward() if used == "mean" else \
        (st.logprobs * g_lp + st.mean_logit * g_mean).sum().backward()
    refs = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    mean = _reference_mean(*refs, labels, **PIPELINES[pipe])
    lp = reference.linear_logprobs(*refs[:2], labels, bias=refs[2], dtype=torch.float64, **PIPELINES[pipe])[0]
    (lp * g_lp + mean * g_mean).sum().backward()
    assert st.mean_logit.dtype == torch.float32 and st.mean_logit.shape == labels.shape
    assert_close(st.mean_logit, mean, atol=2e-5, rtol=2e-5, what="mean_logit")
    assert_close(st.logprobs, lp, atol=2e-5, rtol=2e-5, what="logprobs")
    for a, e, name in zip(leaves, refs, ("d hidden", "d weight", "d bias")):
        assert_close(a.grad, e.grad, atol=2e-5, rtol=2e-5, what=name)
    assert torch.count_nonzero(leaves[0].grad[labels == -100]) == 0


def test_mean_logit_bf16_low_rank_and_nan_rows(path):
    """bf16 operands with a low-rank term: the mean as exact as fp32 math on them, gradients rounded once; a NaN
    hidden row gives a NaN mean there only, and an ignored NaN row a mean of 0 and no gradient anywhere."""
    backend, chunk = path
    hidden, weight, bias, labels = make_inputs(dtype=torch.bfloat16, seed=6)
    a, lw = (torch.randn(N, 3) * 0.5).bfloat16(), (torch.randn(V, 3) * 0.3).bfloat16()
    labels[:2] = torch.tensor([-100, 7])
    hidden[0, 1] = float("nan")  # an ignored row
    pipe = dict(softcap=3.0, temperature=0.7)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias, a, lw)]
    st = fastalign.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], low_rank=tuple(leaves[3:]),
                                   mean_logit=True, backend=backend, chunk=chunk, **pipe)
    g = torch.randn(N)
    (st.mean_logit * g).sum().backward()
    refs = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias, a, lw)]
    mean = _reference_mean(torch.where(refs[0].isnan(), 0.0, refs[0]), refs[1], refs[2], labels, tuple(refs[3:]),
                           **pipe)
    (mean * g).sum().backward()
    assert st.mean_logit[0] == 0 and torch.isfinite(st.mean_logit).all()
    assert_close(st.mean_logit, mean, atol=5e-5, rtol=5e-5, what="mean_logit")
    for leaf, ref, name in zip(leaves, refs, ("d hidden", "d weight", "d bias", "d a", "d L")):
        assert leaf.grad.dtype == torch.bfloat16
        assert_close(leaf.grad, ref.grad, atol=1e-2, rtol=1e-2, what=name)
    hidden[1, 2] = float("nan")  # a scored row
    nan = fastalign.linear_logprobs(hidden, weight, labels, bias=bias, mean_logit=True, backend=backend, chunk=chunk)
    assert torch.isnan(nan.mean_logit[1]) and torch.isfinite(nan.mean_logit[2:]).all()


def test_mean_logit_not_asked_is_none_and_compiles(cpu_backend):
    """Without mean_logit the field is None; with it, torch.compile(fullgraph=True) traces the op and its backward
    with the same numbers."""
    hidden, weight, bias, labels = make_inputs()
    assert fastalign.linear_logprobs(hidden, weight, labels, backend=cpu_backend).mean_logit is None

    def step(h, w, b):
        st = fastalign.linear_logprobs(h, w, labels, bias=b, softcap=5.0, mean_logit=True, backend=cpu_backend)
        return (st.logprobs - 0.1 * st.mean_logit).sum()

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves).backward()
    eager = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    step(*eager).backward()
    for a, b in zip(leaves, eager):
        assert_close(a.grad, b.grad, atol=1e-6, what="compiled grad")
