"""fastalign.linear_topk_logprobs against the float64 log-softmax of the materialised logits: the top-k ids and
their log-probs, a support given, the logit pipeline, response_mask, bf16 inputs, many blocks, the gradients of
hidden, weight and bias, and the bad inputs."""
import math
import warnings

import pytest
import torch

import fastalign
from fastalign import reference
from helpers import assert_close

B, T, H, V = 3, 5, 8, 41


def _head(seed=0, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.6).to(dtype)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    return h, w, b


def _grads(out, inputs, g):
    return torch.autograd.grad((out * g).sum(), [x for x in inputs if x is not None])


#: How the log-probs are normalised and, over the support, the form of its products (support_products: sparse CSR
#: products on the CPU, the head's rows gathered on a GPU; both run here).
NORMALIZATIONS = ["vocabulary", "support-sparse", "support-gathered"]


@pytest.fixture
def renormalize(request, monkeypatch):
    """``renormalize`` of linear_topk_logprobs for one of NORMALIZATIONS (parametrized indirectly), the support's
    products in its form."""
    from fastalign.ops import support_products

    if request.param == "support-gathered":
        monkeypatch.setattr(support_products, "_eager_cpu", lambda t: False)
    return request.param != "vocabulary"


PIPELINES = [dict(), dict(temperature=0.7), dict(logit_scale=0.6, temperature=1.2),
             dict(softcap=2.5, logit_scale=1.4, temperature=1.3)]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=["plain", "temperature", "scale", "softcap-scale"])
@pytest.mark.parametrize("k", [1, 6, V])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
def test_topk_matches_the_float64_log_softmax(pipeline, k, bias, renormalize):
    h, w, b = _head(bias=bias)
    ins = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], k, bias=ins[2], renormalize=renormalize, **pipeline)
    ref = [x.double().requires_grad_() if x is not None else None for x in (h, w, b)]
    lp, ids = reference.linear_topk_logprobs(ref[0], ref[1], k, bias=ref[2], dtype=torch.float64,
                                            renormalize=renormalize, **pipeline)
    assert got.logprobs.dtype == torch.float32 and got.ids.dtype == torch.int64
    assert got.logprobs.shape == got.ids.shape == (B, T, k)
    assert torch.equal(got.ids, ids)
    assert_close(got.logprobs, lp, atol=1e-5, rtol=1e-5, what="logprobs")
    g = torch.randn(B, T, k, generator=torch.Generator().manual_seed(1))
    for a, e in zip(_grads(got.logprobs, ins, g), _grads(lp, ref, g.double())):
        assert_close(a, e, atol=1e-5, rtol=1e-4, what="gradient")


def test_a_support_given_and_ids_outside_the_vocabulary():
    h, w, b = _head(seed=2)
    ids = torch.randint(0, V, (B, T, 4), generator=torch.Generator().manual_seed(3))
    ids[0, 0, 1] = V  # outside: NaN log-prob, no gradient
    ids[1, 2, 3] = -1
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], ids=ids, bias=ins[2], temperature=0.9)
    assert torch.equal(got.ids, ids)
    outside = (ids < 0) | (ids >= V)
    assert torch.isnan(got.logprobs[outside]).all() and not torch.isnan(got.logprobs[~outside]).any()
    ref = [x.double().requires_grad_() for x in (h, w, b)]
    lp, _ = reference.linear_topk_logprobs(ref[0], ref[1], ids=ids.clamp(0, V - 1), bias=ref[2], temperature=0.9,
                                          dtype=torch.float64)
    lp = torch.where(outside, 0.0, lp)
    assert_close(got.logprobs[~outside], lp[~outside], atol=1e-5, rtol=1e-5, what="logprobs")
    g = torch.randn(B, T, 4, generator=torch.Generator().manual_seed(4))
    got_lp = torch.where(outside, 0.0, got.logprobs)
    for a, e in zip(_grads(got_lp, ins, g), _grads(lp, ref, g.double())):
        assert_close(a, e, atol=1e-5, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
def test_a_support_longer_than_the_vocabulary(renormalize):
    """A support of more ids than the vocabulary (some repeated): log-probs and gradients as the float64 ones. Over
    the support, the CPU's sparse products raised a RuntimeError (more stored entries than the matrix has)."""
    g = torch.Generator().manual_seed(5)
    h, w, b = torch.randn(B, T, H, generator=g), torch.randn(3, H, generator=g), torch.randn(3, generator=g)
    ids = torch.randint(0, 3, (B, T, 5), generator=g)
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], ids=ids, bias=ins[2], renormalize=renormalize)
    ref = [x.double().requires_grad_() for x in (h, w, b)]
    lp, _ = reference.linear_topk_logprobs(ref[0], ref[1], ids=ids, bias=ref[2], dtype=torch.float64,
                                          renormalize=renormalize)
    assert_close(got.logprobs, lp, atol=1e-5, rtol=1e-5, what="logprobs")
    up = torch.randn(B, T, 5, generator=g)
    for a, e in zip(_grads(got.logprobs, ins, up), _grads(lp, ref, up.double())):
        assert_close(a, e, atol=1e-5, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("pipeline", PIPELINES[2:], ids=["scale", "softcap-scale"])
@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
def test_the_head_alone_takes_gradients_from_a_frozen_body(pipeline, renormalize):
    """Hidden states without a gradient (a frozen body, a trained head): d(weight) and d(bias) as the float64."""
    h, w, b = _head(seed=18)
    ins = [h, w.clone().requires_grad_(), b.clone().requires_grad_()]
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], 5, bias=ins[2], renormalize=renormalize, **pipeline)
    ref = [h.double(), w.double().requires_grad_(), b.double().requires_grad_()]
    lp, ids = reference.linear_topk_logprobs(*ref[:2], 5, bias=ref[2], dtype=torch.float64, renormalize=renormalize,
                                            **pipeline)
    assert torch.equal(got.ids, ids)
    g = torch.randn(B, T, 5, generator=torch.Generator().manual_seed(19))
    got_grads = torch.autograd.grad((got.logprobs * g).sum(), ins[1:])
    for a, e in zip(got_grads, torch.autograd.grad((lp * g.double()).sum(), ref[1:])):
        assert_close(a, e, atol=1e-5, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("renormalize", NORMALIZATIONS[1:], indirect=True)
def test_renormalized_over_a_support_given_touches_only_its_rows_of_the_head(monkeypatch, renormalize):
    """Renormalised over a support given, no logits are built (K dot products per row) and the backward reaches
    only the support's rows of the head (the others' gradient is exactly 0, as the float64 one); a row with an id
    outside the vocabulary is NaN throughout and gets no gradient; the log-probs equal the vocabulary's
    renormalised by hand; duplicate ids add up, the same bits every run."""
    from fastalign.ops import linear_topk as ops

    chunk_logits = ops.chunk_logits
    monkeypatch.setattr(ops, "chunk_logits", lambda *a, **k: pytest.fail("a support given built the logits"))
    assert renormalize
    h, w, b = _head(seed=2)
    ids = torch.randint(0, V // 2, (B, T, 4), generator=torch.Generator().manual_seed(3))  # ids >= V/2 never used
    ids[0, 1, 2] = ids[0, 1, 0]  # a duplicate
    ids[0, 0, 1] = V  # outside
    ids[1, 2, 3] = -1
    outside_row = ((ids < 0) | (ids >= V)).any(-1)
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], ids=ids, bias=ins[2], temperature=0.9, softcap=2.0,
                                         renormalize=True)
    assert torch.isnan(got.logprobs[outside_row]).all() and not torch.isnan(got.logprobs[~outside_row]).any()
    ref = [x.double().requires_grad_() for x in (h, w, b)]
    lp, _ = reference.linear_topk_logprobs(ref[0], ref[1], ids=ids.clamp(0, V - 1), bias=ref[2], temperature=0.9,
                                          softcap=2.0, dtype=torch.float64, renormalize=True)
    lp = torch.where(outside_row[..., None], 0.0, lp)
    assert_close(got.logprobs[~outside_row], lp[~outside_row], atol=1e-5, rtol=1e-5, what="logprobs")
    with monkeypatch.context() as m:
        m.setattr(ops, "chunk_logits", chunk_logits)
        vocab = fastalign.linear_topk_logprobs(h, w, ids=ids, bias=b, temperature=0.9, softcap=2.0).logprobs
    by_hand = vocab - torch.logsumexp(vocab, -1, keepdim=True)
    torch.testing.assert_close(got.logprobs[~outside_row], by_hand[~outside_row], atol=1e-6, rtol=1e-6)
    g = torch.randn(B, T, 4, generator=torch.Generator().manual_seed(4))
    got_lp = torch.where(outside_row[..., None], 0.0, got.logprobs)
    grads = _grads(got_lp, ins, g)
    assert (grads[0][outside_row] == 0).all()
    assert (grads[1][V // 2:] == 0).all() and (grads[2][V // 2:] == 0).all()
    for a, e in zip(grads, _grads(lp, ref, g.double())):
        assert_close(a, e, atol=1e-5, rtol=1e-4, what="gradient")
    again = fastalign.linear_topk_logprobs(ins[0], ins[1], ids=ids, bias=ins[2], temperature=0.9, softcap=2.0,
                                           renormalize=True).logprobs
    for a, e in zip(_grads(torch.where(outside_row[..., None], 0.0, again), ins, g), grads):
        assert torch.equal(a, e)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
def test_response_mask_rows_cost_nothing_and_a_nan_there_stays_there(mask_dtype, renormalize):
    h, w, b = _head(seed=5)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2] = False
    h[2, 1] = float("nan")  # an unscored row: no NaN anywhere else
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], 5, bias=ins[2], response_mask=mask.to(mask_dtype),
                                         renormalize=renormalize)
    assert (got.logprobs[~mask] == 0).all() and (got.ids[~mask] == 0).all()
    ref = [torch.where(mask[..., None], h, 0.0).double().requires_grad_(), w.double().requires_grad_(),
           b.double().requires_grad_()]
    lp, ids = reference.linear_topk_logprobs(*ref[:2], 5, bias=ref[2], dtype=torch.float64, renormalize=renormalize)
    assert torch.equal(got.ids[mask], ids[mask])
    assert_close(got.logprobs[mask], lp[mask], atol=1e-5, rtol=1e-5, what="logprobs")
    g = torch.randn(B, T, 5, generator=torch.Generator().manual_seed(6))
    grads = _grads(got.logprobs, ins, g)
    want = _grads(lp * mask[..., None], ref, g.double())
    assert (grads[0][~mask] == 0).all()
    for a, e in zip(grads, want):
        assert torch.isfinite(a).all()
        assert_close(a, e, atol=1e-5, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
def test_precision_at_large_logits(renormalize):
    """Logits near 2e4 (a bias offset, temperature 0.5) on a grid where they are exact in fp32: the log-probs and
    gradients carry their own fp32 rounding, not ulp(2e4) ~ 2e-3."""
    h, w, b = _head(seed=13)
    h, w, b = (h * 8).round() / 8, (w * 8).round() / 8, (b * 8).round() / 8 + 1e4
    assert torch.equal((h @ w.T + b).double(), h.double() @ w.double().T + b.double()), "premise: exact logits"
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], 6, bias=ins[2], temperature=0.5, renormalize=renormalize)
    ref = [x.double().requires_grad_() for x in (h, w, b)]
    lp, ids = reference.linear_topk_logprobs(ref[0], ref[1], 6, bias=ref[2], temperature=0.5, dtype=torch.float64,
                                            renormalize=renormalize)
    assert torch.equal(got.ids, ids)
    assert_close(got.logprobs, lp, atol=1e-5, rtol=1e-5, what="logprobs")
    g = torch.randn(B, T, 6, generator=torch.Generator().manual_seed(14))
    for a, e in zip(_grads(got.logprobs, ins, g), _grads(lp, ref, g.double())):
        assert_close(a, e, atol=1e-4, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
def test_nan_in_a_scored_row_propagates_to_that_row(renormalize):
    h, w, b = _head(seed=7)
    h[1, 1, 0] = float("nan")
    got = fastalign.linear_topk_logprobs(h, w, 3, bias=b, renormalize=renormalize)
    assert torch.isnan(got.logprobs[1, 1]).all()
    assert not torch.isnan(got.logprobs[0]).any() and not torch.isnan(got.logprobs[2]).any()


@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
@pytest.mark.parametrize("given", [False, True], ids=["top-k", "ids-given"])
def test_many_blocks_give_the_one_block_numbers(monkeypatch, renormalize, given):
    """Two rows per block of logits (two tiles of V) or of the support's rows of the head (4 x H each, two
    tiles), and, renormalised, d(weight) one column at a time."""
    h, w, b = _head(seed=8)
    ids = torch.randint(0, V, (B, T, 4), generator=torch.Generator().manual_seed(10)) if given else None
    k = None if given else 4
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    one = fastalign.linear_topk_logprobs(*ins[:2], k, ids=ids, bias=ins[2], softcap=3.0, renormalize=renormalize)
    g = torch.randn(B, T, 4, generator=torch.Generator().manual_seed(9))
    want = _grads(one.logprobs, ins, g)
    budget = 2 * 4 * H * 4 * 2 if given and renormalize else 2 * V * 4 * 2
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(budget / (1 << 20)))
    many = fastalign.linear_topk_logprobs(*ins[:2], k, ids=ids, bias=ins[2], softcap=3.0,
                                          response_mask=torch.ones(B, T), renormalize=renormalize)
    assert torch.equal(many.ids, one.ids)
    torch.testing.assert_close(many.logprobs, one.logprobs, atol=1e-6, rtol=1e-6)
    for a, e in zip(_grads(many.logprobs, ins, g), want):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
@pytest.mark.parametrize("given", [False, True], ids=["top-k", "ids-given"])
def test_half_precision_inputs_against_float64(dtype, renormalize, given):
    """Products through fp32 copies on the CPU; the gradients come back in the inputs' dtype (one rounding)."""
    h, w, b = _head(seed=10, dtype=dtype)
    ids = torch.randint(0, V, (B, T, 5), generator=torch.Generator().manual_seed(12)) if given else None
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], None if given else 5, ids=ids, bias=ins[2],
                                         temperature=0.8, renormalize=renormalize)
    ref = [x.double().requires_grad_() for x in (h, w, b)]
    lp, ids = reference.linear_topk_logprobs(ref[0], ref[1], None if given else 5, ids=ids, bias=ref[2],
                                            temperature=0.8, dtype=torch.float64, renormalize=renormalize)
    assert torch.equal(got.ids, ids)
    assert_close(got.logprobs, lp, atol=1e-5, rtol=1e-5, what="logprobs")
    g = torch.randn(B, T, 5, generator=torch.Generator().manual_seed(11))
    for a, e in zip(_grads(got.logprobs, ins, g), _grads(lp, ref, g.double())):
        assert a.dtype == dtype
        rel = float((a.double() - e).norm() / e.norm())
        assert rel < 1e-2, rel


@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
@pytest.mark.parametrize("given", [False, True], ids=["top-k", "ids-given"])
def test_rows_of_any_leading_shape_and_none_at_all(renormalize, given):
    """Any leading shape; no rows, or none scored: log-probs 0 and zero gradients."""
    h, w, b = _head(seed=12)
    ids = torch.randint(0, V, (B, T, 3), generator=torch.Generator().manual_seed(13)) if given else None
    support = dict(ids=ids) if given else dict(k=3)
    flat = fastalign.linear_topk_logprobs(h.reshape(-1, H), w, bias=b, renormalize=renormalize,
                                          **(dict(ids=ids.reshape(-1, 3)) if given else support))
    nested = fastalign.linear_topk_logprobs(h, w, bias=b, renormalize=renormalize, **support)
    assert torch.equal(nested.ids.reshape(-1, 3), flat.ids)
    torch.testing.assert_close(nested.logprobs.reshape(-1, 3), flat.logprobs)
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    empty = fastalign.linear_topk_logprobs(ins[0][:0], ins[1], bias=ins[2], renormalize=renormalize,
                                           **(dict(ids=ids[:0]) if given else support))
    assert empty.logprobs.shape == (0, T, 3)
    none_scored = fastalign.linear_topk_logprobs(*ins[:2], bias=ins[2], response_mask=torch.zeros(B, T),
                                                 renormalize=renormalize, **support)
    assert (none_scored.logprobs == 0).all()
    for grad in torch.autograd.grad(empty.logprobs.sum() + none_scored.logprobs.sum(), ins):
        assert (grad == 0).all()


def test_no_second_derivative():
    """The gradients are computed block by block without a graph: differentiating them again raises."""
    h, w, b = _head(seed=15)
    x = h.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no second derivative"):
        (g,) = torch.autograd.grad(fastalign.linear_topk_logprobs(x, w, 3, bias=b).logprobs.sum(), x,
                                   create_graph=True)
        torch.autograd.grad((g * g).sum(), x)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "exactly one of k"),
    (dict(k=2, ids=torch.zeros(B, T, 2, dtype=torch.int64)), ValueError, "exactly one of k"),
    (dict(k=0), ValueError, "k must be an int >= 1"),
    (dict(k=V + 1), ValueError, "k must be at most the vocabulary size"),
    (dict(k=2.5), TypeError, "k"),
    (dict(ids=torch.zeros(B, T, 2)), TypeError, "ids must be an int64"),
    (dict(ids=torch.zeros(B, 2, dtype=torch.int64)), ValueError, "ids must have shape"),
    (dict(ids=torch.zeros(B, T, 0, dtype=torch.int64)), ValueError, "ids must have shape"),
    (dict(k=2, response_mask=torch.ones(B, T + 1)), ValueError, "response_mask"),
    (dict(k=2, temperature=0.0), ValueError, "temperature"),
    (dict(k=2, softcap=-1.0), ValueError, "softcap"),
    (dict(k=2, renormalize="yes"), TypeError, "renormalize"),
])
def test_bad_inputs_name_the_argument(kwargs, error, match):
    h, w, _ = _head()
    with pytest.raises(error, match=match):
        fastalign.linear_topk_logprobs(h, w, **kwargs)


def test_a_weight_of_another_dtype_or_size_is_named():
    h, w, _ = _head()
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        fastalign.linear_topk_logprobs(h, w.bfloat16(), 2)
    with pytest.raises(ValueError, match="weight must have shape"):
        fastalign.linear_topk_logprobs(h, w[:, :3], 2)


@pytest.mark.gpu
@pytest.mark.parametrize("renormalize", [False, True], ids=["vocabulary", "support"])
def test_gpu_topk_bf16_at_full_vocabulary(monkeypatch, renormalize):
    """bf16 products into fp32 logits on the GPU, many blocks, against the float64 log-softmax."""
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "64")
    N, Hg, Vg, k = 512, 256, 151936, 100
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, Hg, device="cuda", generator=g).bfloat16()
    w = (torch.randn(Vg, Hg, device="cuda", generator=g) / math.sqrt(Hg) * 4).bfloat16()
    b = (torch.randn(Vg, device="cuda", generator=g) * 0.1).bfloat16()
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    mask = torch.rand(N, device="cuda", generator=g) < 0.7
    got = fastalign.linear_topk_logprobs(ins[0], ins[1], k, bias=ins[2], response_mask=mask, softcap=30.0,
                                         renormalize=renormalize)
    ref = [x.double().requires_grad_() for x in (h, w, b)]
    lp, _ = reference.linear_topk_logprobs(ref[0], ref[1], ids=got.ids, bias=ref[2], softcap=30.0,
                                          dtype=torch.float64, renormalize=renormalize)
    lp = lp * mask[:, None]
    assert_close(got.logprobs, lp, atol=1e-4, rtol=1e-4, what="logprobs")
    top = reference.linear_topk_logprobs(h.double(), w.double(), k, bias=b.double(), softcap=30.0,
                                         dtype=torch.float64, renormalize=renormalize)[0]
    # the support is the top k up to near-ties: its log-probs are the float64 top k's
    assert_close(got.logprobs[mask].sort(-1).values, top[mask].sort(-1).values, atol=1e-4, rtol=1e-4,
                 what="top-k values")
    gr = torch.randn(N, k, device="cuda", generator=g)
    grads = _grads(got.logprobs, ins, gr)
    for a, e in zip(grads, _grads(lp, ref, gr.double())):
        rel = float((a.double() - e).norm() / e.norm())
        assert rel < 1e-2, rel
    again = fastalign.linear_topk_logprobs(ins[0], ins[1], k, bias=ins[2], response_mask=mask, softcap=30.0,
                                           renormalize=renormalize)
    for a, e in zip(_grads(again.logprobs, ins, gr), grads):  # deterministic: the same bits
        assert torch.equal(a, e)


@pytest.mark.parametrize("renormalize", NORMALIZATIONS, indirect=True)
def test_torch_compile_fullgraph_gives_the_eager_numbers(renormalize):
    """Under torch.compile the rows are not read on the host (the masked rows run as zeros); one graph. The
    teacher's log-probs at the student's ids too."""
    h, w, b = _head(seed=16)
    teacher = _head(seed=17)[1]
    mask = torch.ones(B, T)
    mask[0, 3:] = 0

    def loss(h, w):
        s = fastalign.linear_topk_logprobs(h, w, 5, bias=b, response_mask=mask, temperature=0.7,
                                           renormalize=renormalize)
        t = fastalign.linear_topk_logprobs(h.detach(), teacher, ids=s.ids, response_mask=mask,
                                           renormalize=renormalize)
        return (s.logprobs.exp() * (s.logprobs - t.logprobs)).sum()

    ins = [x.clone().requires_grad_() for x in (h, w)]
    want = loss(*ins)
    want_grads = torch.autograd.grad(want, ins)
    got = torch.compile(loss, fullgraph=True)(*ins)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for a, e in zip(torch.autograd.grad(got, ins), want_grads):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_calls_from_several_threads_leave_the_warning_filters_as_they_were():
    """The CPU's sparse products once hid torch's sparse-beta notice with ``warnings.catch_warnings()`` around each
    call, which swaps the process's filters: calls from several threads left its "ignore UserWarning" installed,
    silencing every later warning of the process. The notice (once per process) is consumed when fastalign is
    imported."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (torch.randn(2000, 32, generator=g) * 0.1).requires_grad_()
    ids = torch.randint(0, 2000, (64, 16), generator=g)

    def step(_):
        fastalign.linear_topk_logprobs(h, w, ids=ids, renormalize=True).logprobs.sum().backward()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(0)
    assert not [w for w in caught if "sparse" in str(w.message).lower()]  # the notice never reaches a caller
    before = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(step, range(200)))
    assert warnings.filters == before
