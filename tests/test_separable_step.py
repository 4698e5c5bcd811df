"""``separable_step``: a loss separable over items (pairs, triples, rows or tokens), from hidden states and the
head, by the single pass (blocks of whole items through the head once) and by the two passes. Both equal a
float64 plain-PyTorch oracle on materialised logits: the loss, its metrics, the gradients of hidden, weight,
bias and a low-rank term, and the statistics kept for metrics (entropy, argmax, sum p^2) at the scored
positions, and the mean logit; blocks of one item and of the whole batch; the C++ kernels and the Triton kernels in the
interpreter; softcap, logit scale and temperature; bf16 operands."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastalign.linear_preference import coupling
from fastalign.linear_step import separable_step
from helpers import assert_close

B, T, H, V, R = 3, 7, 16, 89, 4
LOGIT = dict(temperature=0.8, softcap=6.0, logit_scale=1.3)


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[B + 1, 5:] = -100  # a short rejected response
    labels[0, 4] = -100  # an unscored token inside a response
    return dict(hidden=torch.randn(2 * B, T, H, generator=g).to(dtype),
                weight=(torch.randn(V, H, generator=g) * 0.3).to(dtype),
                bias=(torch.randn(V, generator=g) * 0.1).to(dtype),
                a=(torch.randn(2 * B, T, R, generator=g) * 0.5).to(dtype),
                L=(torch.randn(V, R, generator=g) * 0.2).to(dtype),
                labels=labels, ref=torch.randn(2 * B, generator=g))


def dpo_like(labels, ref, beta=0.3):
    """A DPO loss with WPO-like pair weights from sum p^2 and the batch's chosen-token NLL (both linear
    in lp with weights the labels fix, or per pair)."""
    mask = (labels != -100).to(torch.float64)

    def loss(lp, sp2):
        lp = lp.double() * mask
        s = lp.sum(-1)
        margin = beta * ((s[:B] - ref[:B].double()) - (s[B:] - ref[B:].double()))
        per_pair = -F.logsigmoid(margin)
        if sp2 is not None:
            w = ((sp2.double().log() * mask).sum(-1) / mask.sum(-1).clamp(min=1)).exp()
            per_pair = per_pair * (w[:B] * w[B:]).detach()
        nll = -s[:B].sum() / mask[:B].sum()
        value = per_pair.mean() + 0.5 * nll
        return value, {"margin": margin.detach().mean(), "nll": nll.detach()}
    return loss


def kto_like(labels, ref, beta=0.4):
    """An unpaired loss: each response's signed sigmoid term and the desirable responses' token-mean NLL."""
    mask = (labels != -100).to(torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)[:labels.shape[0]]

    def loss(lp, sp2):
        assert sp2 is None
        s = (lp.double() * mask).sum(-1)
        desirable = (sign > 0).double()[:, None]
        nll = -(s * desirable[:, 0]).sum() / (mask * desirable).sum()
        value = -F.logsigmoid(sign * beta * (s - ref.double())).mean() + 0.3 * nll
        return value, {"nll": nll.detach()}
    return loss


def tpo_like(labels, ref, beta=0.6):
    """Triples (chosen, rejected, gold rows): a reference-free pair loss of length-averaged log-probs and the
    token-mean NLL of the gold rows (linear in lp with weights the labels fix)."""
    mask = (labels != -100).to(torch.float64)
    k = labels.shape[0] // 3

    def loss(lp, sp2):
        assert sp2 is None
        s = (lp.double() * mask).sum(-1)
        avg = s / mask.sum(-1).clamp(min=1)
        nll = -s[2 * k:].sum() / mask[2 * k:].sum()
        value = -F.logsigmoid(beta * (avg[:k] - avg[k:2 * k]) - 0.2).mean() + 0.7 * nll
        return value, {"nll": nll.detach()}
    return loss


def smoothing_like(labels, ref, eps=0.3):
    """A token-mean NLL with a label-smoothing-like term of the mean logit (its gradient flows), weighted per token:
    separable over tokens, so over any items."""
    mask = (labels != -100).to(torch.float64)
    c = torch.linspace(-1.0, 2.0, labels.numel(), dtype=torch.float64).view(labels.shape)

    def loss(lp, mean_logit):
        value = ((-lp.double() - eps * c * mean_logit.double()) * mask).sum() / mask.sum()
        return value, {"smoothing": (c * mean_logit.double() * mask).sum().detach()}
    return loss


def oracle(d, sum_p2, low_rank, logit, make_loss=dpo_like, mean_logit=False):
    """float64 loss, metrics, gradients and statistics on the materialised logits (``mean_logit``: the mean logit,
    differentiable, as the loss's second argument)."""
    leaves = {k: d[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias", "a", "L")}
    z = leaves["hidden"] @ leaves["weight"].T + leaves["bias"]
    if low_rank:
        z = z + leaves["a"] @ leaves["L"].T
    z = z * logit.get("logit_scale", 1.0)
    cap = logit.get("softcap")
    if cap:
        z = cap * torch.tanh(z / cap)
    z_mean = z.mean(-1)  # the head's logits, before the temperature
    z = z / logit.get("temperature", 1.0)
    logp = torch.log_softmax(z, -1)
    y = d["labels"]
    scored = y != -100
    lp = torch.where(scored, logp.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
    p = logp.exp()
    sp2 = torch.where(scored, (p * p).sum(-1), 1.0)
    aux = torch.where(scored, z_mean, 0.0) if mean_logit else sp2.detach() if sum_p2 else None
    value, metrics = make_loss(y, d["ref"])(lp, aux)
    value.backward()
    names = ("hidden", "weight", "bias") + (("a", "L") if low_rank else ())
    stats = {"logprobs": lp.detach(), "sum_p2": sp2.detach(),
             "entropy": torch.where(scored, -(p * logp).sum(-1), 0.0).detach(),
             "argmax": torch.where(scored, z.argmax(-1), -1),
             "mean_logit": torch.where(scored, z_mean, 0.0).detach()}
    return value.detach(), metrics, [leaves[k].grad for k in names], stats


def run(d, single_pass, *, sum_p2=True, low_rank=True, backend="cpp", logit=LOGIT,
        extras=("entropy", "argmax", "mean_logit"), make_loss=dpo_like, items="pairs", mean_logit=False):
    names = ("hidden", "weight", "bias") + (("a", "L") if low_rank else ())
    leaves = {k: d[k].clone().requires_grad_(True) for k in names}
    value, metrics, stats = separable_step(
        leaves["hidden"], leaves["weight"], d["labels"], make_loss(d["labels"], d["ref"]), bias=leaves["bias"],
        low_rank=(leaves["a"], leaves["L"]) if low_rank else None, sum_p2=sum_p2, mean_logit=mean_logit,
        extras=extras,
        single_pass=single_pass, logit=dict(logit, backend=backend), items=items)
    value.backward()
    return value.detach(), metrics, [leaves[k].grad for k in names], stats


def check(got, want, tol, stats=("logprobs", "sum_p2", "entropy", "argmax", "mean_logit")):
    value, metrics, grads, st = got
    rvalue, rmetrics, rgrads, rst = want
    assert_close(value, rvalue, atol=tol, rtol=tol, what="loss")
    for k in rmetrics:
        assert_close(metrics[k], rmetrics[k], atol=tol, rtol=tol, what=k)
    for g, r, name in zip(grads, rgrads, ("hidden", "weight", "bias", "a", "L")):
        assert_close(g, r, atol=tol, rtol=tol, what=f"d {name}")
    for name in stats:
        if name == "argmax":
            assert torch.equal(st[name], rst[name]), "argmax"
        else:
            assert_close(st[name], rst[name], atol=tol, rtol=tol, what=name)
        assert not st[name].requires_grad, name


@pytest.fixture(params=["1e-9", "1024"], ids=["one-pair-blocks", "one-block"])
def block_mib(request, monkeypatch):
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", request.param)


@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "two-pass"])
@pytest.mark.parametrize("sum_p2,low_rank", [(True, True), (False, False)], ids=["wpo+lora", "plain"])
def test_separable_step_matches_float64(block_mib, single_pass, sum_p2, low_rank):
    d = make()
    got = run(d, single_pass, sum_p2=sum_p2, low_rank=low_rank)
    assert set(got[3]) == {"logprobs", "entropy", "argmax", "mean_logit"} | ({"sum_p2"} if sum_p2 else set())
    check(got, oracle(d, sum_p2, low_rank, LOGIT), 2e-5, stats=tuple(got[3]))


@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "two-pass"])
def test_separable_step_unpaired_matches_float64(block_mib, single_pass):
    """Unpaired responses (KTO): each block holds whole responses, in any order of the classes."""
    d = make(4)
    got = run(d, single_pass, sum_p2=False, make_loss=kto_like, items="rows")
    check(got, oracle(d, False, True, LOGIT, kto_like), 2e-5, stats=("logprobs", "entropy", "argmax", "mean_logit"))


@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "two-pass"])
def test_separable_step_triples_matches_float64(block_mib, single_pass):
    """Triples (TPO's chosen, rejected and gold rows ``i``, ``N/3 + i``, ``2N/3 + i``): each block holds whole
    triples; the gold rows' NLL couples no triple to another."""
    d = make(7)
    got = run(d, single_pass, sum_p2=False, make_loss=tpo_like, items="triples")
    check(got, oracle(d, False, True, LOGIT, tpo_like), 2e-5, stats=("logprobs", "entropy", "argmax", "mean_logit"))


@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "two-pass"])
def test_separable_step_tokens_matches_float64(block_mib, single_pass):
    """Every token its own item (a loss separable over tokens: the SFT NLL with a sum p^2 weight per token): blocks
    of any tokens, across rows."""
    d = make(6)
    mask = (d["labels"] != -100).to(torch.float64)

    def token_loss(labels, ref):
        def loss(lp, sp2):
            value = -(lp.double() * mask * (1 + sp2.double())).sum() / mask.sum()
            return value, {"nll": value.detach()}
        return loss

    got = run(d, single_pass, make_loss=token_loss, items="tokens")
    check(got, oracle(d, True, True, LOGIT, token_loss), 2e-5)


@pytest.mark.parametrize("items", ["pairs", "rows", "triples", "tokens"])
@pytest.mark.parametrize("single_pass", [True, False], ids=["single-pass", "two-pass"])
def test_separable_step_mean_logit_loss_matches_float64(block_mib, single_pass, items):
    """The mean logit as the loss's differentiable second argument (a softcapped head's label smoothing), from the
    loss's own pass: its gradient joins the log-probs' in the same backward (the single pass adds g / V to each
    block's d(logits)); with the mean logit among the extras too."""
    d = make(8)
    got = run(d, single_pass, sum_p2=False, mean_logit=True, make_loss=smoothing_like, items=items)
    assert set(got[3]) == {"logprobs", "entropy", "argmax", "mean_logit"}
    check(got, oracle(d, False, True, LOGIT, smoothing_like, mean_logit=True), 2e-5, stats=tuple(got[3]))


def test_separable_step_mean_logit_loss_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "1e-9")  # blocks of one item: rows put first on the device
    d = make(9)
    for single_pass in (True, False):
        got = run(d, single_pass, sum_p2=False, mean_logit=True, make_loss=smoothing_like, items="tokens",
                  backend="triton", extras=())
        check(got, oracle(d, False, True, LOGIT, smoothing_like, mean_logit=True), 2e-5, stats=("logprobs",))


def test_separable_step_triton_interpreter(block_mib, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d = make(1)
    check(run(d, True, backend="triton"), oracle(d, True, True, LOGIT), 2e-5)


def test_separable_step_bf16_operands():
    """bf16 hidden and head: both paths accumulate in fp32 and agree with the float64 oracle on the same
    (rounded) operands within bf16's output rounding."""
    d = make(2, torch.bfloat16)
    want = oracle(d, True, False, {})
    for single_pass in (True, False):
        got = run(d, single_pass, low_rank=False, logit={})
        check(got, want, 3e-2, stats=("logprobs", "sum_p2", "entropy", "mean_logit"))


def test_separable_step_auto_and_no_grad():
    """Without gradients ``"auto"`` takes the two passes: same loss and statistics, nothing to differentiate."""
    d = make(3)
    with torch.no_grad():
        value, _m, stats = separable_step(d["hidden"], d["weight"], d["labels"], dpo_like(d["labels"], d["ref"]),
                                          bias=d["bias"], items="pairs", extras=("entropy",), logit=LOGIT)
    want = oracle(d, False, False, LOGIT)
    assert_close(value, want[0], atol=2e-5, rtol=2e-5, what="loss")
    assert_close(stats["entropy"], want[3]["entropy"], atol=2e-5, rtol=2e-5, what="entropy")
    assert set(stats) == {"logprobs", "entropy"}


def test_separable_step_auto_keeps_the_block_budget(monkeypatch):
    """``"auto"`` takes the single pass only when one pair's logits fit the block budget (above it, a block
    of one pair would exceed the budget; the two passes stay within their chunks)."""
    import fastalign.linear_step as linear_step

    single, passes = linear_step._single_pass, []
    monkeypatch.setattr(linear_step, "_single_pass", lambda *a: passes.append(1) or single(*a))
    d = make(5)
    pair_mib = 2 * T * V * 4 / 2**20
    want = oracle(d, True, True, LOGIT)
    for mib, taken in ((pair_mib * 0.99, 0), (pair_mib, 1)):
        monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(mib))
        check(run(d, "auto"), want, 2e-5)
        assert len(passes) == taken


def test_separable_step_bad_inputs():
    d = make()
    loss = dpo_like(d["labels"], d["ref"])
    with pytest.raises(ValueError, match="N even"):
        separable_step(d["hidden"][:5], d["weight"], d["labels"][:5], loss, items="pairs")
    with pytest.raises(ValueError, match="multiple of 3"):
        separable_step(d["hidden"][:4], d["weight"], d["labels"][:4], loss, items="triples")
    separable_step(d["hidden"][:5], d["weight"], d["labels"][:5], kto_like(d["labels"][:5], d["ref"][:5]))  # any N
    with pytest.raises(ValueError, match="extras"):
        separable_step(d["hidden"], d["weight"], d["labels"], loss, extras=("mean",))
    with pytest.raises(ValueError, match="single_pass"):
        separable_step(d["hidden"], d["weight"], d["labels"], loss, single_pass="yes")
    with pytest.raises(ValueError, match="sum_p2 and mean_logit"):
        separable_step(d["hidden"], d["weight"], d["labels"], loss, sum_p2=True, mean_logit=True)
    with pytest.raises(TypeError, match="mean_logit"):
        separable_step(d["hidden"], d["weight"], d["labels"], loss, mean_logit="yes")


def test_coupling_names_the_losses_that_are_not_separable_over_pairs():
    assert coupling(["sigmoid", "sft"]) is None
    assert coupling(["sigmoid"], use_weighting=True) is None
    assert "aot" in coupling(["sigmoid", "aot"])
    assert "sft" in coupling(["sigmoid", "sft"], use_weighting=True)


def test_separable_step_compiles_with_fullgraph():
    """Traced, the two passes send every row through the vocabulary: they read the count of labelled rows on the
    host in eager mode only (a data-dependent guard failed torch.compile(fullgraph=True) before)."""
    torch.manual_seed(0)
    h = torch.randn(4, 5, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 37, (4, 5))
    y[:, 0] = -100

    def step(h, w):
        def loss(lp, sp2):
            s = lp.sum(1)
            return -F.logsigmoid(s[:2] - s[2:]).mean(), {}
        return separable_step(h, w, y, loss, items="pairs")[0]

    expected = step(h, w)
    g_expected = torch.autograd.grad(expected, (h, w))
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(h, w)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (h, w)), g_expected):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
