"""Edges of the token-statistics, distillation and single-pass ops: the in-place backward of ``token_logprobs``
(it writes d(logits) over the logits buffer; the memory check refuses only views whose elements overlap, so
size-1 dims of any stride and empty logits pass), the logits layout the ``fastalign::token_stats`` op takes,
``linear_divergence_loss`` / ``fastalign::linear_divergence`` (the hard loss scaled by the incoming gradient in
the two-pass mode, the entropy output without gradient, ``nll`` needing labels), the block budget variable read
before its former name, and the single pass's zero gradient for hidden states of unlabelled positions when the
loss or the head is NaN. Expected values come from float64 log-softmax and autograd, or from the loss not
reading a position at all (gradient exactly 0)."""
import pytest
import torch

import fastalign
from fastalign.reference import divergence as R
from helpers import assert_close

V = 37


def _logits(shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _ref_grad(logits, labels, weights, temperature=1.0):
    """float64 d/d(logits) of sum(w_lp * logprobs + w_ent * entropy) by autograd over log_softmax."""
    x = logits.detach().double().requires_grad_()
    lp_all = torch.log_softmax(x / temperature, -1)
    lp = lp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    ent = -(lp_all.exp() * lp_all).sum(-1) * (labels != -100)
    (weights[0] * lp + weights[1] * ent).sum().backward()
    return x.grad


def test_inplace_backward_writes_the_gradient_over_the_logits(cpu_backend):
    """``inplace_backward=True`` hands back the logits buffer itself as d(logits): after backward the buffer
    holds the gradient (float64 log-softmax), at a temperature and with ignored rows, not its old values."""
    logits = _logits((3, 4, V))
    labels = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(1))
    labels[1, 2] = -100
    leaf = logits.clone().requires_grad_()
    work = leaf * 1.0
    st = fastalign.token_logprobs(work, labels, entropy=True, temperature=0.8, inplace_backward=True,
                                  backend=cpu_backend)
    (st.logprobs - 0.3 * st.entropy).sum().backward()
    want = _ref_grad(logits, labels, (1.0, -0.3), temperature=0.8)
    assert_close(leaf.grad, want, atol=1e-5, rtol=1e-5, what="d logits")
    assert_close(work.detach(), want, atol=1e-5, rtol=1e-5, what="logits buffer after backward")
    assert bool((work.detach()[1, 2] == 0).all())  # an ignored row's gradient is 0


def test_overwritable_is_what_the_in_place_backward_accepts():
    """``fastalign.logprobs.overwritable``: True for logits that need a gradient and that ``inplace_backward=True``
    takes (an intermediate, a slice or a transposed view of one); False for logits without grad, and for a leaf
    that requires it, a view of one and an overlapping view, each of which ``token_logprobs`` refuses with it."""
    from fastalign.logprobs import overwritable

    leaf = _logits((4, V)).requires_grad_()
    inner = leaf * 1.0
    for logits in (inner, inner[1:], inner.t().contiguous().t()):
        assert overwritable(logits), (tuple(logits.shape), logits.stride())
    assert not overwritable(leaf.detach())
    for logits in (leaf, leaf[1:], inner[:1].expand(4, V)):
        assert not overwritable(logits), (tuple(logits.shape), logits.stride())
        labels = torch.zeros(logits.shape[0], dtype=torch.int64)
        with pytest.raises(ValueError, match="inplace_backward"):
            fastalign.token_logprobs(logits, labels, inplace_backward=True, backend="cpp")


def test_inplace_backward_accepts_size_one_dims_of_any_stride(cpu_backend):
    """A dim of size 1 never makes two elements share memory, whatever its stride: a ``[1, V]`` view of ``[V]``
    logits with stride 0 (or 3) on its size-1 dim takes the in-place backward and gets the exact gradient."""
    logits = _logits((V,), seed=2)
    labels = torch.tensor([5])
    want = _ref_grad(logits[None], labels, (1.0, 0.0))[0]
    for stride in (0, 3):
        leaf = logits.clone().requires_grad_()
        view = (leaf * 1.0).as_strided((1, V), (stride, 1))
        st = fastalign.token_logprobs(view, labels, inplace_backward=True, backend=cpu_backend)
        st.logprobs.sum().backward()
        assert_close(leaf.grad, want, atol=1e-6, rtol=1e-6, what=f"d logits, stride {stride}")


def test_inplace_backward_accepts_empty_logits_of_any_layout(cpu_backend):
    """Empty logits have nothing to overwrite: an expanded empty view is not refused by the in-place backward's
    memory check, and gives empty statistics."""
    logits = torch.zeros(1, 0, V).expand(3, 0, V)
    assert logits.stride(0) == 0
    st = fastalign.token_logprobs(logits, torch.zeros(3, 0, dtype=torch.long), entropy=True, inplace_backward=True,
                                  backend=cpu_backend)
    assert st.logprobs.shape == st.entropy.shape == (3, 0)


@pytest.mark.parametrize("layout", ["sliced", "permuted"])
def test_empty_inputs_of_any_layout_give_empty_results(cpu_backend, layout):
    """An empty batch whose vocabulary stride is not 1 (a sliced or permuted view; torch calls every empty tensor
    contiguous, so ``.contiguous()`` keeps its strides) was refused as having non-contiguous rows: it gives empty
    statistics and empty gradients, as a contiguous empty batch does."""
    def empty(seed):
        if layout == "sliced":
            return _logits((0, 2 * V), seed)[:, ::2].requires_grad_(True)
        return _logits((V, 3, 0), seed).permute(1, 2, 0).requires_grad_(True)

    x, t = empty(0), empty(1)
    assert x.numel() == 0 and x.stride(-1) != 1
    labels = torch.zeros(x.shape[:-1], dtype=torch.long)
    st = fastalign.token_logprobs(x, labels, entropy=True, backend=cpu_backend)
    div = fastalign.token_divergence(x, t, labels, backend=cpu_backend)
    el = fastalign.elementwise_divergence(x, t, divergence="kl", log_target=True, backend=cpu_backend)
    assert st.logprobs.shape == st.entropy.shape == div.divergence.shape == labels.shape
    (st.logprobs.sum() + st.entropy.sum() + div.divergence.sum() + el.sum()).backward()
    assert x.grad.shape == x.shape and t.grad is None  # the teacher / target is a constant, as with tokens


@pytest.mark.parametrize("shape", [(4, 7), (1, 1, 4, 7)])
def test_token_stats_op_refuses_logits_not_three_dimensional(shape):
    """The ``fastalign::token_stats`` op reads ``[outer, inner, V]`` logits: other ranks raise a ValueError that
    names the expected layout (not an unpacking or layout error from deeper in)."""
    logits = torch.randn(shape)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits must be \[outer, inner, V\]"):
        torch.ops.fastalign.token_stats(logits, labels, 1.0, -100, False, False, False, "cpp", False)


def _div_batch(seed=3, N=6, H=8, Ht=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.3
    ht = torch.randn(N, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, b, ht, wt, y


@pytest.mark.parametrize("single_pass", [True, False])
def test_hard_loss_gradient_scales_by_the_incoming_gradient(single_pass):
    """d(c * loss) = c * d(loss) for the hard (NLL) term too, in both modes (the two-pass backward folds the
    incoming gradient into the per-row weights of D and of the NLL): against float64 autograd."""
    h, w, b, ht, wt, y = _div_batch()
    hg, wg, bg = (t.clone().requires_grad_() for t in (h, w, b))
    kw = dict(beta=0.5, labels=y, hard_weight=0.7, soft_weight=0.4)
    loss, _ = fastalign.linear_divergence_loss(hg, wg, ht, wt, bias=bg, single_pass=single_pass, backend="cpp", **kw)
    grads = torch.autograd.grad(-2.5 * loss, (hg, wg, bg))
    ref_in = [t.double().requires_grad_() for t in (h, w, b)]
    rl, _ = R.linear_divergence_loss(ref_in[0], ref_in[1], ht, wt, bias=ref_in[2], **kw)
    ref = torch.autograd.grad(-2.5 * rl, ref_in)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref):
        assert_close(g, r, atol=2e-5, rtol=2e-5, what=f"d{name}")


def _op_args(h, w, b, ht, wt, mask, labels, nll):
    return (h, w, b, ht, wt, None, mask, labels, 1.0, 0.0, 1.0, 0.0, 1.0, "jsd", 0.5, -100, nll, "cpp")


def test_linear_divergence_op_entropy_has_no_gradient():
    """``fastalign::linear_divergence`` is differentiable in the divergence and the NLL; its entropy output is a
    metric, marked without gradient (a backward through it would silently give 0)."""
    h, w, b, ht, wt, y = _div_batch(seed=4)
    hg = h.clone().requires_grad_()
    div, ent, nll = torch.ops.fastalign.linear_divergence(*_op_args(hg, w, b, ht, wt, torch.ones(6), y, True))
    assert div.requires_grad and nll.requires_grad and not ent.requires_grad
    want = R.entropy(torch.nn.functional.linear(h.double(), w.double(), b.double()))
    assert_close(ent, want, atol=1e-5, rtol=1e-5, what="entropy")


def test_linear_divergence_op_nll_needs_labels():
    """Asking the op for the NLL without labels is a ValueError (the kernels would read labels from no buffer)."""
    h, w, b, ht, wt, _y = _div_batch(seed=5)
    with pytest.raises(ValueError, match="nll needs labels"):
        torch.ops.fastalign.linear_divergence(*_op_args(h, w, b, ht, wt, torch.ones(6), None, True))


def test_block_budget_variable_wins_over_its_former_name(monkeypatch):
    """``FASTALIGN_BLOCK_MIB`` is read before its former name ``FASTALIGN_PAIR_BLOCK_MIB``: when both are set the
    current one gives the budget (and a bad value under the former name is then never read)."""
    from fastalign.ops.single_pass import env_mib

    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "8")
    monkeypatch.setenv("FASTALIGN_PAIR_BLOCK_MIB", "16")
    assert env_mib("FASTALIGN_BLOCK_MIB", 64.0, "FASTALIGN_PAIR_BLOCK_MIB") == 8.0
    monkeypatch.setenv("FASTALIGN_PAIR_BLOCK_MIB", "abc")
    assert env_mib("FASTALIGN_BLOCK_MIB", 64.0, "FASTALIGN_PAIR_BLOCK_MIB") == 8.0
    monkeypatch.delenv("FASTALIGN_BLOCK_MIB")
    monkeypatch.setenv("FASTALIGN_PAIR_BLOCK_MIB", "16")
    assert env_mib("FASTALIGN_BLOCK_MIB", 64.0, "FASTALIGN_PAIR_BLOCK_MIB") == 16.0


@pytest.mark.parametrize("compaction", ["0", "1"])
def test_single_pass_gradient_of_an_unlabelled_row_is_zero_with_a_nan_head(monkeypatch, compaction):
    """The loss does not read the hidden state of a position whose label is ``ignore_index``, so its gradient is
    exactly 0 even when the head holds a NaN (which makes the loss and every labelled row's gradient NaN): with
    the Triton kernels every row goes through the head in the single pass, with or without device compaction."""
    monkeypatch.setenv("FASTALIGN_DEVICE_COMPACTION", compaction)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    w = torch.randn(V, 8, generator=g)
    w[3, 2] = float("nan")
    labels = torch.randint(0, V, (2, 4), generator=g)
    labels[0, 1] = labels[1, 3] = -100
    mask = (labels != -100).float()
    zeros = torch.zeros(2, 4)
    loss, _ = fastalign.LinearPolicyLoss(loss_type="reinforce", single_pass=True, backend="triton")(
        h, w, labels, zeros, torch.ones(2, 4), mask)
    loss.backward()
    assert torch.isnan(loss)
    unlabelled = labels == -100
    assert bool((h.grad[unlabelled] == 0).all()), h.grad[unlabelled]
    assert bool(torch.isnan(h.grad[~unlabelled]).all())


def test_orpo_nan_loss_keeps_the_gradient_of_unlabelled_rows_zero():
    """ORPO's NaN loss (a pair of empty responses) is carried to the gradients of the head and of every labelled
    row in the single pass; the hidden states of positions whose label is ``ignore_index`` are not read by the
    loss, so their gradient stays exactly 0."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (4, 5), generator=g)
    y[1], y[3] = -100, -100  # pair 1: no chosen and no rejected token
    y[0, 4] = y[2, 0] = -100
    loss, _ = fastalign.LinearPreferenceLoss(loss_type="orpo", beta=0.2, single_pass=True)(h, w, y)
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert torch.isnan(loss) and torch.isnan(dw).all()
    unlabelled = y == -100
    assert bool((dh[unlabelled] == 0).all())
    assert bool(torch.isnan(dh[~unlabelled]).all())


def test_an_ignored_row_gives_zero_statistics_and_its_own_argmax(cpu_backend):
    """A row labelled ignore_index gives 0 log-prob, entropy, sum p^2 (and mean logit from hidden states) and a zero
    gradient, while its argmax is the row's own (as the docstrings say), from logits and from hidden states."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 9, generator=g, requires_grad=True)
    y = torch.tensor([1, -100, 2, -100])
    s = fastalign.token_logprobs(z, y, entropy=True, sum_p2=True, argmax=True, backend=cpu_backend)
    ignored = y == -100
    for field in (s.logprobs, s.entropy, s.sum_p2):
        assert torch.equal(field[ignored], torch.zeros(2))
    assert torch.equal(s.argmax, z.detach().argmax(-1))
    (s.logprobs + s.entropy).sum().backward()
    assert torch.equal(z.grad[ignored], torch.zeros(2, 9))
    h, w = torch.randn(4, 5, generator=g), torch.randn(9, 5, generator=g)
    s = fastalign.linear_logprobs(h, w, y, entropy=True, sum_p2=True, argmax=True, mean_logit=True,
                                  backend=cpu_backend)
    for field in (s.logprobs, s.entropy, s.sum_p2, s.mean_logit):
        assert torch.equal(field[ignored], torch.zeros(2))
    assert torch.equal(s.argmax, (h @ w.T).argmax(-1))
