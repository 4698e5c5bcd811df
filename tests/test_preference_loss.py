"""preference_loss / sequence_logprobs / PreferenceLoss / LinearPreferenceLoss vs the docs/math.md#preference-losses reference."""
import importlib.util
import inspect

import pytest
import torch
from helpers import assert_close

import fastalign as fa
from fastalign.reference import preference as R

D = torch.float64
REF_ONLY = {"simpo", "cpo", "orpo", "alphapo", "sft"}  # no reference model


def _pairs(B=6, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randn(B, generator=g, dtype=dtype) * 4 - 25
    lr = torch.randn(B, generator=g, dtype=dtype) * 4 - 28
    lc0 = lc + torch.randn(B, generator=g, dtype=dtype) * 2
    lr0 = lr + torch.randn(B, generator=g, dtype=dtype) * 2
    nc = torch.randint(3, 40, (B,), generator=g).to(dtype)  # ragged lengths
    nr = torch.randint(3, 40, (B,), generator=g).to(dtype)
    return lc, lr, lc0, lr0, nc, nr


def _check_metrics(m, mr):
    assert set(m) == set(mr), (set(m), set(mr))
    for k in mr:
        assert m[k].dim() == 0 and not m[k].requires_grad, k
        assert_close(m[k], mr[k], atol=1e-10, rtol=1e-10, what=k)


def _run_both(kw_fa, kw_ref, lc, lr, lc0, lr0, with_ref=True):
    a = [t.clone().requires_grad_(True) for t in (lc, lr)]
    b = [t.clone().requires_grad_(True) for t in (lc, lr)]
    refs = (lc0, lr0) if with_ref else (None, None)
    loss, m = fa.preference_loss(a[0], a[1], *refs, **kw_fa)
    loss_r, mr = R.preference_loss(b[0], b[1], *refs, **kw_ref)
    assert loss.dim() == 0
    assert_close(loss, loss_r, atol=1e-10, rtol=1e-9, what="loss")
    _check_metrics(m, mr)
    ga = torch.autograd.grad(loss, a, allow_unused=True)
    gb = torch.autograd.grad(loss_r, b, allow_unused=True)
    for x, y, name in zip(ga, gb, ("d/d chosen", "d/d rejected")):
        x = torch.zeros_like(lc) if x is None else x
        y = torch.zeros_like(lc) if y is None else y
        assert_close(x, y, atol=1e-10, rtol=1e-8, what=name)
    return loss, m


# ------------------------------------------------------------------ every row, eps 0 and > 0

SMOOTHED = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "sigmoid_norm", "simpo", "cpo", "alphapo"}
F_SCORED = {"sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm", "sft"}


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", fa.PREFERENCE_LOSS_TYPES)
def test_each_loss_matches_reference(loss_type, eps):
    lc, lr, lc0, lr0, nc, nr = _pairs()
    with_ref = loss_type not in REF_ONLY
    kw = dict(loss_type=loss_type, beta=0.2, label_smoothing=eps, chosen_lengths=nc, rejected_lengths=nr)
    if eps and loss_type not in SMOOTHED:
        with pytest.raises(ValueError, match="label_smoothing"):
            fa.preference_loss(lc, lr, lc0, lr0, **kw)
        return
    _run_both(kw, dict(loss_types=(loss_type,), beta=0.2, eps=eps, nc=nc, nr=nr), lc, lr, lc0, lr0, with_ref)


def test_row_flags_match_the_documented_sets():
    from fastalign.preference import LOSSES
    assert {t for t in fa.PREFERENCE_LOSS_TYPES if LOSSES[t].smoothing} == SMOOTHED
    assert {t for t in fa.PREFERENCE_LOSS_TYPES if LOSSES[t].f_score} == F_SCORED


@pytest.mark.parametrize("average", ["log_ratio", "score"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sigmoid_norm", "discopop"])
@pytest.mark.parametrize("fdiv,f_alpha", [("forward_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5),
                                          ("alpha_divergence", -0.3), ("alpha_divergence", 0.0)])
def test_f_divergence_scores(loss_type, fdiv, f_alpha, average):
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=3)
    # log-ratios of a few nats, where exp(-x) is representable in both averages
    lc0, lr0 = lc + (lc0 - lc) / 4, lr + (lr0 - lr) / 4
    if average == "score" and loss_type not in ("ipo", "sigmoid_norm"):  # read by those two rows only
        with pytest.raises(ValueError, match="f_length_average"):
            fa.preference_loss(lc, lr, lc0, lr0, loss_type=loss_type, f_divergence=fdiv, f_alpha=f_alpha,
                               f_length_average=average, chosen_lengths=nc, rejected_lengths=nr)
        return
    _run_both(dict(loss_type=loss_type, f_divergence=fdiv, f_alpha=f_alpha, f_length_average=average,
                   chosen_lengths=nc, rejected_lengths=nr),
              dict(loss_types=(loss_type,), f=fdiv, f_alpha=f_alpha, f_avg=average, nc=nc, nr=nr), lc, lr, lc0, lr0)


def test_f_length_average_changes_only_length_averaged_rows_and_not_reverse_kl():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=3)
    lc0, lr0 = lc + (lc0 - lc) / 4, lr + (lr0 - lr) / 4
    kw = dict(chosen_lengths=nc, rejected_lengths=nr)
    for t in ("ipo", "sigmoid_norm"):
        a, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=t, f_length_average="score", **kw)
        b, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=t, **kw)
        assert torch.equal(a, b), "reverse KL: f(x)/|y| == f(x/|y|)"
        a, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=t, f_divergence="forward_kl", f_length_average="score",
                                  **kw)
        b, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=t, f_divergence="forward_kl", **kw)
        assert not torch.allclose(a, b)


@pytest.mark.parametrize("loss_type", sorted(set(fa.PREFERENCE_LOSS_TYPES) - F_SCORED))
def test_f_divergence_on_a_row_it_does_not_apply_to_raises(loss_type):
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=3)
    with pytest.raises(ValueError, match="f_divergence"):
        fa.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", loss_type], f_divergence="forward_kl",
                           chosen_lengths=nc, rejected_lengths=nr)


def test_smoothed_losses_picks_the_rows_that_take_label_smoothing():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=9)
    types = ("sigmoid", "robust", "aot", "hinge")
    _run_both(dict(loss_type=list(types), loss_weights=[1.0, 0.5, 0.3, 0.2], label_smoothing=0.2,
                   smoothed_losses=["robust", "aot"]),
              dict(loss_types=types, loss_weights=[1.0, 0.5, 0.3, 0.2], eps=0.2, smoothed=("robust", "aot")),
              lc, lr, lc0, lr0)
    plain, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type="sigmoid")
    # sigmoid left out of the smoothed rows: eps does not reach it
    robust_only = ["sigmoid", "robust"]
    a, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=robust_only, label_smoothing=0.2, smoothed_losses="robust")
    b, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type="robust", label_smoothing=0.2)
    assert_close(a, plain + b, atol=1e-12, what="sigmoid unsmoothed + robust smoothed")
    with pytest.raises(ValueError, match="smoothed_losses"):
        fa.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", "hinge"], label_smoothing=0.1,
                           smoothed_losses=["hinge"])
    with pytest.raises(ValueError, match="smoothed_losses"):
        fa.preference_loss(lc, lr, lc0, lr0, loss_type="sigmoid", label_smoothing=0.1, smoothed_losses=["robust"])
    with pytest.raises(ValueError, match="label_smoothing"):
        fa.preference_loss(lc, lr, lc0, lr0, loss_type="sigmoid", label_smoothing=0.1, smoothed_losses=[])
    with pytest.raises(ValueError, match="f_length_average"):
        fa.preference_loss(lc, lr, lc0, lr0, f_length_average="sum")


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("split", [(3, 5), (4, 4), (0, 3), (2, 0)])
def test_unpaired_matches_reference(loss_type, split):
    from fastalign.preference import unpaired_preference_loss
    g = torch.Generator().manual_seed(sum(split))
    n = sum(split)
    des = torch.tensor([True] * split[0] + [False] * split[1])[torch.randperm(n, generator=g)]
    lp = torch.randn(n, generator=g, dtype=D) * 4 - 25
    lp0 = lp + torch.randn(n, generator=g, dtype=D)
    kl = (torch.randn(7, generator=g, dtype=D) + 0.3) if loss_type == "kto" else None
    for kl_given in ((None, kl) if kl is not None else (None,)):
        a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        loss, m = unpaired_preference_loss(a, lp0, des, loss_type=loss_type, beta=0.3, desirable_weight=1.3,
                                           undesirable_weight=0.7, kto_kl=kl_given)
        loss_r, mr = R.unpaired_loss(b, lp0, des, loss_type=loss_type, beta=0.3, wd=1.3, wu=0.7, kl=kl_given)
        assert_close(loss, loss_r, atol=1e-12, what="loss")
        assert set(m) == set(mr)
        for k in mr:
            if torch.isnan(mr[k]):
                assert torch.isnan(m[k]), k
            else:
                assert_close(m[k], mr[k], atol=1e-12, what=k)
        assert_close(torch.autograd.grad(loss, a)[0], torch.autograd.grad(loss_r, b)[0], atol=1e-12, what="grad")


def test_unpaired_balanced_kto_equals_the_paired_row_and_bad_inputs_raise():
    from fastalign.preference import unpaired_preference_loss
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=11)
    kl = torch.tensor([0.4, 0.9], dtype=D)
    paired, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type="kto", kto_kl=kl, desirable_weight=2.0)
    des = torch.tensor([True] * 6 + [False] * 6)
    unpaired, _ = unpaired_preference_loss(torch.cat([lc, lr]), torch.cat([lc0, lr0]), des, kto_kl=kl,
                                           desirable_weight=2.0)
    assert_close(paired, unpaired, atol=1e-12, what="balanced kto")
    x = torch.cat([lc, lr])
    with pytest.raises(TypeError, match="desirable"):
        unpaired_preference_loss(x, None, des.long())
    with pytest.raises(ValueError, match="kto_kl"):
        unpaired_preference_loss(x, None, des, loss_type="apo_zero_unpaired", kto_kl=kl)
    with pytest.raises(ValueError, match="loss_type"):
        unpaired_preference_loss(x, None, des, loss_type="sigmoid")
    with pytest.raises(ValueError, match="desirable"):
        unpaired_preference_loss(x, None, des[:3])


def test_wpo_weights_cap():
    wc = torch.tensor([0.3, -0.2, -2.0], dtype=D)
    wr = torch.tensor([0.4, 0.1, -1.0], dtype=D)
    assert_close(fa.wpo_weights(wc, wr), torch.exp(wc + wr).clamp(max=1.0), atol=0, what="capped")
    assert_close(fa.wpo_weights(wc, wr, cap=None), torch.exp(wc + wr), atol=0, what="uncapped")
    assert fa.wpo_weights(wc, wr, cap=None).max() > 1.0


def test_wpo_weights_are_detached():
    """The WPO pair weights are constants of the step (``sg`` in WPO): differentiable per-sequence
    log-weights give weights that carry no gradient, whatever the cap."""
    wc = torch.tensor([0.3, -0.2, -2.0], dtype=D, requires_grad=True)
    wr = torch.tensor([0.4, 0.1, -1.0], dtype=D, requires_grad=True)
    for cap in (1.0, None):
        w = fa.wpo_weights(wc * 1.0, wr * 1.0, cap=cap)
        assert not w.requires_grad, cap
        assert_close(w, torch.exp(wc.detach() + wr.detach()).clamp(max=cap or float("inf")), atol=0, what=f"cap {cap}")


def test_reverse_kl_is_plain_dpo_and_js_matches_trl_form():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=4)
    a, _ = fa.preference_loss(lc, lr, lc0, lr0, f_divergence="reverse_kl")
    b, _ = fa.preference_loss(lc, lr, lc0, lr0)
    assert torch.equal(a, b)
    # JS: d' = d - (softplus(dc) - softplus(dr))
    dc, dr = lc - lc0, lr - lr0
    d = dc - dr - (torch.nn.functional.softplus(dc) - torch.nn.functional.softplus(dr))
    js, _ = fa.preference_loss(lc, lr, lc0, lr0, f_divergence="js_divergence")
    assert_close(js, -torch.nn.functional.logsigmoid(0.1 * d).mean(), atol=1e-12, what="js")


def test_loss_list_weights_rpo_and_pair_weights():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=5)
    w = torch.rand(lc.shape[0], dtype=D)
    _run_both(dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[0.7, 0.2, 0.1], rpo_alpha=0.5,
                   pair_weights=w, chosen_lengths=nc, rejected_lengths=nr),
              dict(loss_types=("sigmoid", "sft", "bco_pair"), loss_weights=[0.7, 0.2, 0.1], rpo_alpha=0.5,
                   pair_weights=w, nc=nc, nr=nr), lc, lr, lc0, lr0)


def test_pair_weights_get_no_gradient():
    """Per-pair ``weights`` are detached (the formula's ``ω_i``, e.g. WPO's): weights that require grad get
    none, and the log-prob gradients are the float64 reference's."""
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=13)
    w = (torch.rand(lc.shape[0], dtype=D) + 0.5).requires_grad_(True)
    a, b = lc.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    loss, _ = fa.preference_loss(a, b, lc0, lr0, loss_type="sigmoid", beta=0.3, pair_weights=w)
    want, _ = R.preference_loss(lc, lr, lc0, lr0, beta=0.3, pair_weights=w.detach())
    assert_close(loss, want, atol=1e-12, what="weighted loss")
    assert torch.autograd.grad(loss, w, retain_graph=True, allow_unused=True)[0] is None


def test_options_kto_kl_class_weights_cpo_alpha_gamma():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=6)
    kl = torch.randn(9, dtype=D) + 0.5
    _run_both(dict(loss_type="kto", kto_kl=kl, desirable_weight=1.5, undesirable_weight=0.5),
              dict(loss_types=("kto",), kto_kl=kl, wd=1.5, wu=0.5), lc, lr, lc0, lr0)
    for t, alpha in (("simpo", {}), ("alphapo", dict(alphapo_alpha=0.1))):
        _run_both(dict(loss_type=t, simpo_gamma=1.0, chosen_lengths=nc, rejected_lengths=nr, **alpha),
                  dict(loss_types=(t,), gamma=1.0, alpha=alpha.get("alphapo_alpha", 0.0), nc=nc, nr=nr),
                  lc, lr, lc0, lr0, False)
    nll = torch.tensor(1.7, dtype=D)
    _run_both(dict(loss_type="cpo", cpo_alpha=0.3, chosen_nll=nll), dict(loss_types=("cpo",), cpo_alpha=0.3, nll=nll),
              lc, lr, lc0, lr0, False)
    _run_both(dict(loss_type="discopop", discopop_tau=0.5), dict(loss_types=("discopop",), tau=0.5),
              lc, lr, lc0, lr0)


def test_kto_batch_kl_baseline_is_a_constant_of_the_gradient():
    """KTO without ``kto_kl``: ``z0 = sg(max(mean KL, 0))`` from the batch's own log-ratios. With the policy above
    the reference the mean is positive (the clamp passes it through) and ``z0`` still carries no gradient:
    loss and gradient against the float64 reference."""
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=12)
    lc0, lr0 = lc0 - 3.0, lr0 - 3.0
    assert float(torch.cat([lc - lc0, lr - lr0]).mean()) > 0.5
    _run_both(dict(loss_type="kto", beta=0.3, desirable_weight=1.5), dict(loss_types=("kto",), beta=0.3, wd=1.5),
              lc, lr, lc0, lr0)


@pytest.mark.parametrize("option", [dict(simpo_gamma=5.0), dict(cpo_alpha=0.3), dict(alphapo_alpha=0.1),
                                    dict(discopop_tau=0.5), dict(bco_delta=0.2), dict(desirable_weight=2.0),
                                    dict(undesirable_weight=0.5), dict(kto_kl="tensor"), dict(f_alpha=0.5)])
def test_an_option_no_loss_row_reads_raises(option):
    """An option that only some loss rows read, given to a loss list without them, is refused by name (the
    function and the modules alike); at its default it is accepted."""
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=6)
    if option.get("kto_kl") == "tensor":
        option = dict(kto_kl=torch.zeros(9, dtype=D))
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        fa.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", "hinge"], **option)
    if name != "kto_kl":
        with pytest.raises(ValueError, match=name):
            fa.PreferenceLoss(loss_type="sigmoid", **option)
        default = {k: fa.preference_loss.__wrapped__.__kwdefaults__[k] for k in option}
        fa.preference_loss(lc, lr, lc0, lr0, loss_type="sigmoid", **default)


@pytest.mark.parametrize("eps", [0.5, 0.7, 1.0])
def test_label_smoothing_from_one_half(eps):
    """The smoothed logistic loss is defined on all of [0, 1] (OpenRLHF's conservative DPO takes it there):
    ``-(1-eps) log sigma(beta d) - eps log sigma(-beta d)``, in float64."""
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=3)
    loss, _ = fa.preference_loss(lc, lr, lc0, lr0, label_smoothing=eps, beta=0.3)
    x = 0.3 * ((lc - lc0) - (lr - lr0))
    expected = (-(1 - eps) * torch.nn.functional.logsigmoid(x) - eps * torch.nn.functional.logsigmoid(-x)).mean()
    assert_close(loss, expected, atol=1e-12, what="smoothed sigmoid")


def test_alphapo_zero_alpha_is_simpo_and_exo_default_eps():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=7)
    kw = dict(chosen_lengths=nc, rejected_lengths=nr)
    a, _ = fa.preference_loss(lc, lr, loss_type="alphapo", alphapo_alpha=0.0, **kw)
    b, _ = fa.preference_loss(lc, lr, loss_type="simpo", **kw)
    assert_close(a, b, atol=1e-14, what="alphapo(0) == simpo")
    e0, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type="exo_pair")
    e1, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type="exo_pair", label_smoothing=1e-3)
    assert torch.equal(e0, e1)


def test_reference_free_and_bf16_inputs_give_fp32():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=8, dtype=torch.float32)
    a, m = fa.preference_loss(lc, lr)
    b, _ = fa.preference_loss(lc, lr, torch.zeros_like(lc), torch.zeros_like(lr))
    assert torch.equal(a, b)
    c, m = fa.preference_loss(lc.bfloat16(), lr.bfloat16(), lc0.bfloat16(), lr0.bfloat16())
    assert c.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m.values())


def test_reference_logps_get_no_gradient():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=9)
    lc0 = lc0.clone().requires_grad_(True)
    loss, _ = fa.preference_loss(lc.requires_grad_(True), lr, lc0, lr0)
    assert torch.autograd.grad(loss, lc0, allow_unused=True)[0] is None


def test_module_matches_function():
    lc, lr, lc0, lr0, nc, nr = _pairs(seed=10)
    mod = fa.PreferenceLoss(loss_type=["ipo", "sigmoid"], beta=0.3, loss_weights=[1.0, 2.0])
    a, _ = mod(lc, lr, lc0, lr0, chosen_lengths=nc, rejected_lengths=nr)
    b, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=["ipo", "sigmoid"], beta=0.3, loss_weights=[1.0, 2.0],
                              chosen_lengths=nc, rejected_lengths=nr)
    assert torch.equal(a, b)
    assert "ipo" in repr(mod)


def test_bad_inputs():
    lc, lr, lc0, lr0, nc, nr = _pairs()
    with pytest.raises(ValueError, match="loss_type"):
        fa.preference_loss(lc, lr, loss_type="dpo2")
    with pytest.raises(ValueError, match="rejected_logprobs"):
        fa.preference_loss(lc, lr[:3])
    with pytest.raises(ValueError, match="both"):
        fa.preference_loss(lc, lr, lc0, None)
    with pytest.raises(ValueError, match="chosen_lengths"):
        fa.preference_loss(lc, lr, lc0, lr0, loss_type="ipo")
    with pytest.raises(ValueError, match="NLL"):
        fa.preference_loss(lc, lr, loss_type="sft")
    with pytest.raises(ValueError, match="label_smoothing"):
        fa.preference_loss(lc, lr, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        fa.preference_loss(lc, lr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        fa.preference_loss(lc, lr, beta=0.0)
    with pytest.raises(ValueError, match="loss_weights"):
        fa.preference_loss(lc, lr, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="f_divergence"):
        fa.preference_loss(lc, lr, f_divergence="tv")
    with pytest.raises(TypeError, match="chosen_logprobs"):
        fa.preference_loss(lc.long(), lr)
    with pytest.raises(ValueError, match="chosen_logprobs"):
        fa.preference_loss(lc.view(2, 3), lr.view(2, 3))
    with pytest.raises(TypeError, match="unknown option"):
        fa.PreferenceLoss(gamma=1.0)
    with pytest.raises(ValueError, match="loss_type"):
        fa.PreferenceLoss(loss_type="nope")


def test_compile_fullgraph():
    lc, lr, lc0, lr0, nc, nr = _pairs(dtype=torch.float32)
    lp = torch.randn(4, 9)
    mask = torch.rand(4, 9) > 0.3

    def step(lp, mask, lc0, lr0):
        s = fa.sequence_logprobs(lp, mask, ld_alpha=0.5)
        return fa.preference_loss(s.sum[:2], s.sum[2:], lc0[:2], lr0[:2], loss_type=["sigmoid", "aot", "ipo", "kto"],
                                  chosen_lengths=s.count[:2], rejected_lengths=s.count[2:], rpo_alpha=0.1)

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(lp, mask, lc0, lr0)
    want = step(lp, mask, lc0, lr0)
    assert_close(got[0], want[0], atol=1e-6, what="compiled loss")

    cu = torch.tensor([0, 3, 7, 12])

    def packed(x, cu):
        return fa.sequence_logprobs(x, cu_seqlens=cu, ld_alpha=0.3, ld_lengths=torch.tensor([2.0, 1.0, 4.0])).sum

    x = torch.randn(12)
    torch._dynamo.reset()
    assert_close(torch.compile(packed, fullgraph=True, backend="aot_eager")(x, cu), packed(x, cu), atol=1e-6,
                 what="compiled packed")


# ------------------------------------------------------------------ sequence_logprobs

def _padded(S=6, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(S, T, generator=g, dtype=D) * 5
    lens = torch.randint(1, T + 1, (S,), generator=g)
    start = torch.randint(0, 3, (S,), generator=g)
    pos = torch.arange(T)
    mask = (pos >= start[:, None]) & (pos < (start + lens).clamp(max=T)[:, None])
    mask[0] = False  # an empty response
    return lp, mask


def test_sequence_logprobs_padded_vs_reference():
    lp, mask = _padded()
    tw = torch.rand(lp.shape, dtype=D)
    for kw in (dict(), dict(token_weights=tw), dict(ld_alpha=0.4), dict(token_weights=tw, ld_alpha=0.4)):
        x = lp.clone().requires_grad_(True)
        got = fa.sequence_logprobs(x, mask, **kw)
        s, mean, n = R.sequence_logprobs(lp, mask, kw.get("token_weights"), kw.get("ld_alpha"))
        assert_close(got.sum, s, atol=1e-12, what=f"sum {list(kw)}")
        assert_close(got.mean, mean, atol=1e-12, what=f"mean {list(kw)}")
        assert_close(got.count, n, atol=0, what="count")
        (g,) = torch.autograd.grad(got.sum.sum(), x)
        xr = lp.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(R.sequence_logprobs(xr, mask, kw.get("token_weights"), kw.get("ld_alpha"))[0].sum(),
                                    xr)
        assert_close(g, gr, atol=1e-12, what="grad")
    assert float(fa.sequence_logprobs(lp, mask).mean[0]) == 0.0  # empty sequence


def test_sequence_logprobs_labels_mask_and_junk_in_masked_slots():
    lp, mask = _padded(seed=1)
    labels = torch.where(mask, torch.randint(0, 50, lp.shape), torch.full(lp.shape, -100))
    junk = torch.where(mask, lp, torch.full_like(lp, float("nan")))
    a = fa.sequence_logprobs(junk, labels=labels)
    b = fa.sequence_logprobs(lp, mask.float())
    assert_close(a.sum, b.sum, atol=0, what="labels mask")


@pytest.mark.parametrize("mask_kind", ["bool", "fractional", "packed"])
def test_sequence_logprobs_junk_in_unscored_slots_stays_out(mask_kind):
    """NaN / inf in the masked slots of the log-probs, token weights and sum_p2 (and past the last packed sequence)
    reach no sum, mean, wpo or gradient, for a bool mask (whose 0/1 weights multiply nothing), a fractional one
    and a packed stream."""
    g = torch.Generator().manual_seed(5)
    lp, tw, sp2 = -torch.rand(3, 4, 6, generator=g, dtype=D)
    mask = torch.rand(4, 6, generator=g) > 0.3
    weights = mask.to(D) * torch.rand(4, 6, generator=g, dtype=D) if mask_kind == "fractional" else mask
    kw = {}
    if mask_kind == "packed":
        kw = dict(cu_seqlens=torch.tensor([0, 5, 9, 20]))  # the last 4 slots belong to no sequence
        mask[-1, 2:] = True  # scored, but past the last sequence
        weights = mask
    junk = torch.tensor([float("nan"), float("inf")], dtype=D)[torch.arange(24) % 2].view(4, 6)
    out = ~mask if mask_kind != "packed" else ~mask | (torch.arange(24).view(4, 6) >= 20)

    def run(x, w, s, m):
        if mask_kind == "packed":
            x, w, s, m = (t.reshape(-1) for t in (x, w, s, m))
        return fa.sequence_logprobs(x, m, token_weights=w, sum_p2=s, **kw)

    x = torch.where(out, junk, lp).requires_grad_()
    got = run(x, torch.where(out, junk, tw), torch.where(out, junk, sp2), weights)
    clean = lp.clone().requires_grad_()
    kept = weights if mask_kind == "fractional" else mask & ~out
    want = run(clean, tw, sp2, kept)
    for name in ("sum", "mean", "count", "wpo"):
        assert_close(getattr(got, name), getattr(want, name), atol=1e-12, what=name)
    (gx,), (gc,) = torch.autograd.grad(got.sum.sum(), x), torch.autograd.grad(want.sum.sum(), clean)
    assert_close(gx, gc, atol=0, what="grad")


def test_sequence_logprobs_packed_matches_padded():
    g = torch.Generator().manual_seed(2)
    lens = [5, 1, 7, 3, 4, 6]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    N, T = int(cu[-1]), max(lens)
    x = -torch.rand(N, generator=g, dtype=D) * 4
    m = torch.rand(N, generator=g) > 0.25  # prompt / masked tokens inside the packed stream
    tw = torch.rand(N, generator=g, dtype=D)
    pos = torch.cat([torch.arange(n) for n in lens])
    xp, valid = R.packed_to_padded(x, cu, T)
    mp, _ = R.packed_to_padded(m, cu, T)
    twp, _ = R.packed_to_padded(tw, cu, T)
    for kw in (dict(), dict(ld_alpha=0.25)):
        want = fa.sequence_logprobs(xp, mp & valid, token_weights=twp, **kw)
        got = fa.sequence_logprobs(x, m, cu_seqlens=cu, token_weights=tw, **kw)
        got2 = fa.sequence_logprobs(x.unsqueeze(0), m.unsqueeze(0), position_ids=pos.unsqueeze(0),
                                    num_sequences=len(lens), token_weights=tw.unsqueeze(0), **kw)
        for k in ("sum", "mean", "count"):
            assert_close(getattr(got, k), getattr(want, k), atol=1e-12, what=f"cu_seqlens {k} {list(kw)}")
            assert_close(getattr(got2, k), getattr(want, k), atol=1e-12, what=f"position_ids {k} {list(kw)}")


def test_sequence_logprobs_packed_tail_outside_sequences_is_dropped():
    x = torch.arange(1.0, 11.0, dtype=D)
    got = fa.sequence_logprobs(x, cu_seqlens=torch.tensor([0, 3, 7]))  # tokens 7..9 are padding
    assert_close(got.sum, torch.tensor([6.0, 22.0], dtype=D), atol=0, what="sum")
    assert_close(got.count, torch.tensor([3.0, 4.0], dtype=D), atol=0, what="count")
    # position_ids have no tail outside the sequences: a cut-off sequence before the first start, or more
    # sequences than num_sequences, is refused (test_preference_regressions.py)
    pos = torch.tensor([5, 6, 0, 1, 2, 0, 1, 0, 1, 2])
    with pytest.raises(ValueError, match="position_ids must start at 0"):
        fa.sequence_logprobs(x, position_ids=pos, num_sequences=2)


def test_sequence_logprobs_wpo_field():
    lp, mask = _padded(seed=3)
    sp2 = torch.rand(lp.shape, dtype=D) * 0.5 + 0.1
    got = fa.sequence_logprobs(lp.requires_grad_(True), mask, sum_p2=sp2)
    m = mask.to(D)
    want = ((lp.detach() - sp2.log()) * m).sum(-1) / m.sum(-1).clamp(min=1)
    assert_close(got.wpo, want, atol=1e-12, what="wpo")
    assert not got.wpo.requires_grad
    w = fa.wpo_weights(got.wpo[:3], got.wpo[3:])
    assert_close(w, torch.exp(want[:3] + want[3:]).clamp(max=1), atol=1e-12, what="pair weights")


def test_sequence_logprobs_bad_inputs():
    lp, mask = _padded()
    with pytest.raises(ValueError, match="mask"):
        fa.sequence_logprobs(lp, mask[:, :3])
    with pytest.raises(ValueError, match="num_sequences"):
        fa.sequence_logprobs(lp.reshape(-1), position_ids=torch.zeros(lp.numel(), dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        fa.sequence_logprobs(lp.reshape(-1), cu_seqlens=torch.tensor([0, 66]),
                             position_ids=torch.zeros(lp.numel(), dtype=torch.long))
    with pytest.raises(ValueError, match="odd"):
        fa.sequence_logprobs(lp[:5], mask[:5], ld_alpha=0.5)
    with pytest.raises(ValueError, match=r"\[S, T\]"):
        fa.sequence_logprobs(lp.reshape(-1))
    with pytest.raises(TypeError, match="cu_seqlens"):
        fa.sequence_logprobs(lp.reshape(-1), cu_seqlens=torch.tensor([0.0, 66.0]))


# ------------------------------------------------------------------ from hidden states

def _hidden_batch(B=3, T=7, H=16, V=61, seed=0, prompt=2):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :prompt] = -100
    lens = torch.randint(1, T - prompt + 1, (2 * B,), generator=g)
    pos = torch.arange(T)
    labels[pos[None, :] >= (prompt + lens)[:, None]] = -100  # ragged padding
    rh = h + 0.1 * torch.randn(h.shape, generator=g)
    return h, w, b, labels, rh


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "orpo", "kto", ["sigmoid", "sft"]])
def test_linear_matches_logits_path(loss_type):
    h, w, b, labels, rh = _hidden_batch()
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    mod = fa.LinearPreferenceLoss(loss_type=loss_type, beta=0.2)
    loss, m = mod(hx, wx, labels, bias=b, ref_hidden=rh)
    hr, wr = h.double().requires_grad_(True), w.double().requires_grad_(True)
    loss_r, mr = R.linear_preference_loss(hr, wr, labels, bias=b.double(), ref_hidden=rh.double(), loss_types=types,
                                          beta=0.2, dtype=D)
    assert_close(loss, loss_r, atol=2e-5, rtol=1e-4, what="loss")
    for k in mr:
        assert_close(m[k], mr[k], atol=2e-4, rtol=1e-4, what=k)
    gh, gw = torch.autograd.grad(loss, (hx, wx))
    ghr, gwr = torch.autograd.grad(loss_r, (hr, wr))
    assert_close(gh, ghr, atol=2e-5, rtol=1e-3, what="d hidden")
    assert_close(gw, gwr, atol=2e-5, rtol=1e-3, what="d weight")


@pytest.mark.parametrize("single_pass", [False, True])
def test_linear_backends(cpu_backend, single_pass, one_pair_blocks):
    if cpu_backend == "triton" and importlib.util.find_spec("fastalign.kernels.linear_stats") is None:
        pytest.skip("the Triton linear_logprobs kernels are not in this build yet")
    h, w, b, labels, rh = _hidden_batch(seed=6)
    mod = fa.LinearPreferenceLoss(loss_type="sigmoid", beta=0.2, backend=cpu_backend, single_pass=single_pass)
    hx = h.clone().requires_grad_(True)
    loss, _ = mod(hx, w, labels, bias=b, ref_hidden=rh)
    hr = h.double().requires_grad_(True)
    loss_r, _ = R.linear_preference_loss(hr, w.double(), labels, bias=b.double(), ref_hidden=rh.double(), beta=0.2,
                                         dtype=D)
    assert_close(loss, loss_r, atol=2e-5, rtol=1e-4, what=f"{cpu_backend} loss")
    assert_close(torch.autograd.grad(loss, hx)[0], torch.autograd.grad(loss_r, hr)[0], atol=2e-5, rtol=1e-3,
                 what=f"{cpu_backend} d hidden")


def test_linear_reference_as_hidden_or_as_logps_and_separate_layout():
    h, w, b, labels, rh = _hidden_batch(seed=1)
    B = h.shape[0] // 2
    mod = fa.LinearPreferenceLoss(beta=0.1)
    a, _ = mod(h, w, labels, bias=b, ref_hidden=rh)
    rlp, valid = R.token_logps_from_hidden(rh, w, labels, b)
    rs = (rlp * valid).sum(-1)
    c, _ = mod(h, w, labels, bias=b, ref_chosen_logprobs=rs[:B], ref_rejected_logprobs=rs[B:])
    assert_close(a, c, atol=1e-6, rtol=1e-5, what="ref hidden vs ref logps")
    d, _ = mod((h[:B], h[B:, :5]), w, (labels[:B], labels[B:, :5]), bias=b, ref_hidden=(rh[:B], rh[B:, :5]))
    labels5 = labels.clone()
    labels5[B:, 5:] = -100
    e, _ = mod(h, w, labels5, bias=b, ref_hidden=rh)
    assert_close(d, e, atol=1e-6, rtol=1e-5, what="separate vs concatenated")
    # the reference head is never differentiated
    rhx = rh.clone().requires_grad_(True)
    loss, _ = mod(h.requires_grad_(True), w, labels, bias=b, ref_hidden=rhx)
    assert torch.autograd.grad(loss, rhx, allow_unused=True)[0] is None


def test_linear_packed_matches_padded():
    h, w, b, labels, rh = _hidden_batch(seed=2, prompt=1)
    valid_rows = [(labels[i] != -100) | (torch.arange(labels.shape[1]) < 1) for i in range(labels.shape[0])]
    hs, ys, rs, lens = [], [], [], []
    for i, keep in enumerate(valid_rows):
        n = int(keep.sum())
        hs.append(h[i, :n]); ys.append(labels[i, :n]); rs.append(rh[i, :n]); lens.append(n)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    mod = fa.LinearPreferenceLoss(loss_type=["sigmoid", "sft"], beta=0.1, ld_alpha=0.5)
    a, ma = mod(h, w, labels, bias=b, ref_hidden=rh)
    c, mc = mod(torch.cat(hs), w, torch.cat(ys), bias=b, ref_hidden=torch.cat(rs), cu_seqlens=cu)
    assert_close(c, a, atol=1e-6, rtol=1e-5, what="packed vs padded")
    assert_close(mc["nll"], ma["nll"], atol=1e-6, rtol=1e-5, what="nll")


def test_linear_packed_reference_takes_the_token_weights():
    """A packed batch with ``token_weights`` and ``ref_hidden``: the policy and the reference sums are both
    weighted, ``sum_t w_t (lp_t - ref_t)``, as in the padded layouts; loss and gradient against the float64
    logits path."""
    h, w, b, labels, rh = _hidden_batch(seed=4, prompt=1)
    B = h.shape[0] // 2
    tw = torch.rand(labels.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    lens = [int(((row != -100) | (torch.arange(labels.shape[1]) < 1)).sum()) for row in labels]

    def packed(x):
        return torch.cat([x[i, :n] for i, n in enumerate(lens)])

    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    hx = packed(h).requires_grad_(True)
    loss, _ = fa.LinearPreferenceLoss(beta=0.5)(hx, w, packed(labels), bias=b, ref_hidden=packed(rh),
                                                token_weights=packed(tw), cu_seqlens=cu)
    hr = h.double().requires_grad_(True)
    lp, valid = R.token_logps_from_hidden(hr, w.double(), labels, b.double(), dtype=D)
    rlp, _ = R.token_logps_from_hidden(rh.double(), w.double(), labels, b.double(), dtype=D)
    s, _, _ = R.sequence_logprobs(lp, valid, tw.double())
    r, _, _ = R.sequence_logprobs(rlp, valid, tw.double())
    want, _ = R.preference_loss(s[:B], s[B:], r[:B], r[B:], beta=0.5)
    assert_close(loss, want, atol=2e-5, rtol=1e-4, what="packed, weighted reference")
    (g,) = torch.autograd.grad(loss, hx)
    (gr,) = torch.autograd.grad(want, hr)
    assert_close(g, packed(gr).float(), atol=2e-5, rtol=1e-3, what="d hidden")


def test_linear_wpo_token_weights_ld_against_logits_path():
    h, w, b, labels, rh = _hidden_batch(seed=3)
    B = h.shape[0] // 2
    tw = torch.rand(labels.shape)
    mod = fa.LinearPreferenceLoss(loss_type=["sigmoid", "sft"], beta=0.1, ld_alpha=0.3, use_weighting=True)
    hx = h.clone().requires_grad_(True)
    loss, m = mod(hx, w, labels, bias=b, ref_hidden=rh, token_weights=tw)
    # the same through explicitly built logits and the fused token_logprobs kernel
    hy = h.clone().requires_grad_(True)
    st = fa.token_logprobs(hy @ w.T + b, labels, sum_p2=True)
    with torch.no_grad():
        rst = fa.token_logprobs(rh @ w.T + b, labels)
    s = fa.sequence_logprobs(st.logprobs, labels=labels, token_weights=tw, ld_alpha=0.3, sum_p2=st.sum_p2)
    r = fa.sequence_logprobs(rst.logprobs, labels=labels, token_weights=tw, ld_alpha=0.3)
    plain = fa.sequence_logprobs(st.logprobs, labels=labels)
    nll = -plain.sum[:B].sum() / plain.count[:B].sum()
    want, mw = fa.preference_loss(s.sum[:B], s.sum[B:], r.sum[:B], r.sum[B:], loss_type=["sigmoid", "sft"],
                                  chosen_nll=nll, pair_weights=fa.wpo_weights(s.wpo[:B], s.wpo[B:]))
    assert_close(loss, want, atol=1e-6, rtol=1e-5, what="loss")
    assert_close(m["nll"], mw["nll"], atol=1e-6, rtol=1e-5, what="nll")
    (g,) = torch.autograd.grad(loss, hx)
    (gy,) = torch.autograd.grad(want, hy)
    assert_close(g, gy, atol=1e-6, rtol=1e-4, what="d hidden")


@pytest.mark.parametrize("labelled", ["neither", "chosen", "rejected", "both"])
@pytest.mark.parametrize("single_pass", [False, True])
def test_linear_compact_rows_equal_whole_batch(labelled, single_pass):
    """Compacting the labelled rows changes nothing, also when a side has every row labelled."""
    h, w, b, labels, rh = _hidden_batch(seed=5)
    B = h.shape[0] // 2
    full = torch.randint(0, w.shape[0], labels[:B].shape, generator=torch.Generator().manual_seed(1))
    if labelled in ("chosen", "both"):
        labels[:B] = full
    if labelled in ("rejected", "both"):
        labels[B:] = full
    for layout in ("concatenated", "separate"):
        outs = []
        for compact in (True, False):
            mod = fa.LinearPreferenceLoss(loss_type=["sigmoid", "sft"], ld_alpha=0.5, use_weighting=not single_pass,
                                          compact=compact, single_pass=single_pass)
            hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            if layout == "concatenated":
                loss, m = mod(hx, wx, labels, bias=b, ref_hidden=rh)
            else:
                loss, m = mod((hx[:B], hx[B:]), wx, (labels[:B], labels[B:]), bias=b, ref_hidden=(rh[:B], rh[B:]))
            outs.append((loss, m["nll"], *torch.autograd.grad(loss, (hx, wx))))
        for x, y, what in zip(outs[0], outs[1], ("loss", "nll", "d hidden", "d weight")):
            assert_close(x, y, atol=1e-6, rtol=1e-5, what=f"{layout} {what}")
    with pytest.raises(ValueError, match="compact"):
        fa.LinearPreferenceLoss(compact="yes")


def test_labelled_rows_are_compacted_once(monkeypatch):
    """On the C++ kernels the two-pass path leaves the compaction to linear_logprobs (which gathers the
    labelled rows itself); the single pass and the Triton kernels get the rows compacted by the module."""
    h, w, b, labels, rh = _hidden_batch(seed=6)
    paths = fa.LinearPreferenceLoss().paths
    assert not paths.compacts(h, single=False, backend="cpp")
    assert paths.compacts(h, single=True, backend="cpp") and paths.compacts(h, single=False, backend="triton")
    assert fa.LinearPreferenceLoss(compact=True).paths.compacts(h, single=False, backend="cpp")
    import fastalign.ops.linear_cpu as ls

    gathers = []
    labelled = ls.labelled_rows
    monkeypatch.setattr(ls, "labelled_rows", lambda y, i: gathers.append(labelled(y, i)) or gathers[-1])
    hx = h.clone().requires_grad_(True)
    loss, _ = fa.LinearPreferenceLoss(backend="cpp", single_pass=False)(hx, w, labels, bias=b)
    loss.backward()
    # forward and backward each find the labelled rows once, on the whole batch (not on compacted rows)
    assert len(gathers) == 2 and all(g is not None and g.numel() == int((labels != -100).sum()) for g in gathers)


def test_ops_layer_takes_the_loss_as_a_callback():
    import ast
    import inspect

    import fastalign.ops.single_pass as blocks

    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(blocks))) if isinstance(n, ast.ImportFrom)}
    assert all(not m.startswith("fastalign") or m.startswith("fastalign.ops") for m in imported), imported


def test_linear_bad_inputs():
    h, w, b, labels, rh = _hidden_batch()
    mod = fa.LinearPreferenceLoss()
    with pytest.raises(ValueError, match="hidden-size"):
        mod(h[..., :0], w[:, :0], labels)
    with pytest.raises(ValueError, match=r"\[2B, T, H\]"):
        mod(h[:5], w, labels[:5])
    with pytest.raises(ValueError, match="labels"):
        mod(h, w, labels[:, :3])
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 16\) \(hidden.shape\[-1\] = 16\)"):
        mod(h, w[:, :5], labels)
    with pytest.raises(ValueError, match="not both"):
        mod(h, w, labels, ref_hidden=rh, ref_chosen_logprobs=torch.zeros(3), ref_rejected_logprobs=torch.zeros(3))
    with pytest.raises(ValueError, match="pairs"):
        mod((h[:3], h[3:]), w, labels)
    with pytest.raises(TypeError, match="unknown option"):
        fa.LinearPreferenceLoss(tau=1.0)


def test_linear_compile_fullgraph():
    h, w, b, labels, rh = _hidden_batch(seed=4)
    mod = fa.LinearPreferenceLoss(loss_type="sigmoid", beta=0.1)
    torch._dynamo.reset()
    got, _ = torch.compile(mod, fullgraph=True, backend="aot_eager")(h, w, labels, bias=b, ref_hidden=rh)
    want, _ = mod(h, w, labels, bias=b, ref_hidden=rh)
    assert_close(got, want, atol=1e-6, what="compiled linear loss")


# ------------------------------------------------------------------ single pass (gradients in the forward)

SEPARABLE = [t for t in fa.PREFERENCE_LOSS_TYPES if t not in ("aot", "aot_unpaired", "kto")]


@pytest.fixture
def one_pair_blocks(monkeypatch):
    """Blocks of a single pair, so every pair's share of the loss is taken on its own."""
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "1e-9")


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("loss_type", SEPARABLE)
def test_single_pass_against_reference(loss_type, compact, one_pair_blocks):
    h, w, b, labels, rh = _hidden_batch(seed=7)
    hx, wx, bx = (t.clone().requires_grad_(True) for t in (h, w, b))
    mod = fa.LinearPreferenceLoss(loss_type=loss_type, beta=0.2, single_pass=True, compact=compact)
    loss, m = mod(hx, wx, labels, bias=bx, ref_hidden=rh)
    hr, wr, br = (t.double().requires_grad_(True) for t in (h, w, b))
    loss_r, mr = R.linear_preference_loss(hr, wr, labels, bias=br, ref_hidden=rh.double(), loss_types=(loss_type,),
                                          beta=0.2, dtype=D)
    assert_close(loss, loss_r, atol=2e-5, rtol=1e-4, what="loss")
    for k in mr:
        assert_close(m[k], mr[k], atol=2e-4, rtol=1e-4, what=k)
    for got, want, what in zip(torch.autograd.grad(loss, (hx, wx, bx)), torch.autograd.grad(loss_r, (hr, wr, br)),
                               ("d hidden", "d weight", "d bias")):
        assert_close(got, want, atol=2e-5, rtol=1e-3, what=what)


def _both_paths(mod_kw, call, seed=8):
    """(loss, metrics, grads) of the two-pass and the single-pass paths for the same call."""
    h, w, b, labels, rh = _hidden_batch(seed=seed, B=4)
    out = []
    for single in (False, True):
        hx, wx, bx = (t.clone().requires_grad_(True) for t in (h, w, b))
        loss, m = call(fa.LinearPreferenceLoss(single_pass=single, **mod_kw), hx, wx, bx, labels, rh)
        out.append((loss, m, torch.autograd.grad(loss, (hx, wx, bx))))
    return out


def _assert_same(two, one, what):
    assert_close(one[0], two[0], atol=1e-6, rtol=1e-5, what=f"{what} loss")
    for k in two[1]:
        assert_close(one[1][k], two[1][k], atol=1e-6, rtol=1e-5, what=f"{what} {k}")
    for g1, g2, name in zip(one[2], two[2], ("d hidden", "d weight", "d bias")):
        assert_close(g1, g2, atol=1e-6, rtol=1e-4, what=f"{what} {name}")


@pytest.mark.parametrize("blocks", ["one pair", "whole batch"])
@pytest.mark.parametrize("options", [
    dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5, rpo_alpha=0.3, label_smoothing=0.1),
    dict(loss_type="sigmoid_norm", use_weighting=True),
    dict(loss_type=["ipo", "hinge"], loss_weights=[0.5, 2.0], f_divergence="js_divergence"),
    dict(loss_type="orpo", softcap=3.0, temperature=0.7, logit_scale=1.3),
], ids=["ld+rpo+sft", "wpo", "weighted-list", "logit-pipeline"])
def test_single_pass_equals_two_pass(options, blocks, monkeypatch):
    if blocks == "one pair":
        monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "1e-9")
    tw = torch.rand(8, 7, generator=torch.Generator().manual_seed(0))

    def concatenated(mod, h, w, b, y, rh):
        return mod(h, w, y, bias=b, ref_hidden=rh, token_weights=tw)

    def separate(mod, h, w, b, y, rh):  # rejected responses shorter than chosen ones
        return mod((h[:4], h[4:, :5]), w, (y[:4], y[4:, :5]), bias=b, ref_hidden=(rh[:4], rh[4:, :5]),
                   token_weights=(tw[:4], tw[4:, :5]))

    for call in (concatenated, separate):
        two, one = _both_paths(options, call)
        _assert_same(two, one, call.__name__)


def test_single_pass_kto_with_given_kl_and_reference_logps(one_pair_blocks):
    kl = torch.tensor(0.05)
    rs = torch.randn(8, generator=torch.Generator().manual_seed(1)) - 5.0

    def call(mod, h, w, b, y, rh):
        return mod(h, w, y, bias=b, ref_chosen_logprobs=rs[:4], ref_rejected_logprobs=rs[4:], kto_kl=kl)

    two, one = _both_paths(dict(loss_type="kto"), call)
    _assert_same(two, one, "kto")


@pytest.mark.parametrize("single_pass", [False, True])
def test_linear_nll_of_a_batch_with_no_chosen_token(single_pass):
    """Every chosen response empty (all its labels ``ignore_index``): the chosen NLL is ``-0 / max(0, 1) = 0``,
    not ``0 / 0``, on both paths; loss, metrics and gradient against the float64 logits path (which counts
    the batch's chosen tokens at least once too)."""
    h, w, b, labels, rh = _hidden_batch(seed=10)
    B = h.shape[0] // 2
    labels[:B] = -100
    hx = h.clone().requires_grad_(True)
    mod = fa.LinearPreferenceLoss(loss_type=["sigmoid", "sft"], beta=0.2, rpo_alpha=0.5, single_pass=single_pass)
    loss, m = mod(hx, w, labels, bias=b, ref_hidden=rh)
    hr = h.double().requires_grad_(True)
    want, mr = R.linear_preference_loss(hr, w.double(), labels, bias=b.double(), ref_hidden=rh.double(),
                                        loss_types=("sigmoid", "sft"), beta=0.2, rpo_alpha=0.5, dtype=D)
    assert float(mr["nll"]) == 0.0
    assert_close(loss, want, atol=2e-5, rtol=1e-4, what="loss")
    assert_close(m["nll"], mr["nll"], atol=0, what="nll")
    assert_close(torch.autograd.grad(loss, hx)[0], torch.autograd.grad(want, hr)[0], atol=2e-5, rtol=1e-3,
                 what="d hidden")


def test_single_pass_bf16(one_pair_blocks):
    h, w, b, labels, rh = _hidden_batch(seed=9)
    grads = []
    for single in (False, True):
        hx, wx = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
        mod = fa.LinearPreferenceLoss(beta=0.2, single_pass=single)
        loss, _ = mod(hx, wx, labels, ref_hidden=rh.bfloat16())
        grads.append((loss, *torch.autograd.grad(loss, (hx, wx))))
    for x, y, what in zip(grads[0], grads[1], ("loss", "d hidden", "d weight")):
        assert x.dtype == y.dtype
        assert_close(y.float(), x.float(), atol=1e-2, rtol=2e-2, what=f"bf16 {what}")


def test_single_pass_where_it_does_not_apply(monkeypatch):
    h, w, b, labels, rh = _hidden_batch()
    with pytest.raises(ValueError, match="couples the pairs"):
        fa.LinearPreferenceLoss(loss_type="aot", single_pass=True)
    with pytest.raises(ValueError, match="NLL"):
        fa.LinearPreferenceLoss(loss_type="cpo", use_weighting=True, single_pass=True)
    with pytest.raises(ValueError, match="kto_kl"):
        fa.LinearPreferenceLoss(loss_type="kto", single_pass=True)(h, w, labels)
    with pytest.raises(ValueError, match="single_pass"):
        fa.LinearPreferenceLoss(single_pass="yes")
    cu = torch.tensor([0, 3, 6, 9, 12, 15, 18])
    with pytest.raises(ValueError, match="packed"):
        fa.LinearPreferenceLoss(single_pass=True)(h.reshape(-1, h.shape[-1])[:18], w, labels.reshape(-1)[:18],
                                                 cu_seqlens=cu)
    # "auto" takes the two-pass path for coupled losses, without gradients, for a bf16 head on the CPU and
    # for a pair whose logits exceed the block budget (same values either way); the single pass for a
    # separable loss with an fp32 head
    paths = fa.LinearPreferenceLoss().paths
    hg = h.clone().requires_grad_(True)
    B = h.shape[0] // 2
    assert not fa.LinearPreferenceLoss(loss_type="aot").paths.single_passes(None, w, hg[:B], hg[B:])
    assert not paths.single_passes(None, w, h[:B], h[B:])
    assert not paths.single_passes(None, w.bfloat16(), hg[:B].bfloat16(), hg[B:].bfloat16())
    assert paths.single_passes(None, w, hg[:B], hg[B:])
    pair_mib = 2 * h.shape[1] * w.shape[0] * 4 / 2**20
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(pair_mib * 0.99))
    assert not paths.single_passes(None, w, hg[:B], hg[B:])
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", str(pair_mib))
    assert paths.single_passes(None, w, hg[:B], hg[B:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("single_pass", ["auto", False])
def test_gpu_linear_against_reference(dtype, single_pass, monkeypatch):
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "32")  # a few pairs (80 rows each) per block at this vocabulary
    # fp32 in full fp32 products: TF32, the GPU default for an fp32 head, rounds the logits to about 1e-3
    monkeypatch.setenv("FASTALIGN_FP32_MATMUL", "ieee")
    h, w, b, labels, rh = _hidden_batch(B=6, T=40, H=64, V=32011, seed=11, prompt=9)
    mod = fa.LinearPreferenceLoss(loss_type=["sigmoid", "sft"], beta=0.2, single_pass=single_pass)
    hx, wx = h.to("cuda", dtype).requires_grad_(True), w.to("cuda", dtype).requires_grad_(True)
    assert mod.paths.single_passes(None, wx, hx[:6], hx[6:]) == (single_pass == "auto")
    loss, m = mod(hx, wx, labels.cuda(), ref_hidden=rh.to("cuda", dtype))
    hr, wr = h.to(dtype).double().requires_grad_(True), w.to(dtype).double().requires_grad_(True)
    loss_r, mr = R.linear_preference_loss(hr, wr, labels, ref_hidden=rh.to(dtype).double(),
                                          loss_types=("sigmoid", "sft"), beta=0.2, dtype=D)
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    assert_close(loss.cpu(), loss_r, **tol, what="loss")
    for k in mr:
        assert_close(m[k].cpu(), mr[k], **tol, what=k)
    for got, want, what in zip(torch.autograd.grad(loss, (hx, wx)), torch.autograd.grad(loss_r, (hr, wr)),
                               ("d hidden", "d weight")):
        assert got.dtype == dtype
        assert_close(got.float().cpu(), want, atol=tol["atol"], rtol=5e-2, what=what)


def test_single_pass_scales_by_the_incoming_gradient_once():
    h, w, b, labels, rh = _hidden_batch(seed=12)
    out = []
    for single in (False, True):
        hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = fa.LinearPreferenceLoss(beta=0.2, single_pass=single)(hx, wx, labels, ref_hidden=rh)
        (3.0 * loss).backward(retain_graph=True)
        out.append((hx.grad, wx.grad))
        if single:
            with pytest.raises(RuntimeError, match="once per forward"):
                loss.backward()
    for x, y, what in zip(out[0], out[1], ("d hidden", "d weight")):
        assert_close(y, x, atol=1e-6, rtol=1e-5, what=what)


def test_linear_wpo_cap_option():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(4, 5, 6, generator=g), torch.randn(9, 6, generator=g)
    y = torch.randint(0, 9, (4, 5), generator=g)
    capped, _ = fa.LinearPreferenceLoss(use_weighting=True)(h, w, y)
    uncapped, _ = fa.LinearPreferenceLoss(use_weighting=True, wpo_cap=None)(h, w, y)
    same, _ = fa.LinearPreferenceLoss(use_weighting=True, wpo_cap=1e9)(h, w, y)
    assert_close(uncapped, same, atol=1e-7, what="no cap == huge cap")
    assert torch.isfinite(capped)
    with pytest.raises(ValueError, match="wpo_cap"):
        fa.LinearPreferenceLoss(wpo_cap=None)


def test_loss_type_lists_have_one_name_each():
    import warnings

    assert "sigmoid" in fa.PREFERENCE_LOSS_TYPES and "grpo" in fa.POLICY_LOSS_TYPES
    with pytest.warns(DeprecationWarning, match="PREFERENCE_LOSS_TYPES"):
        assert fa.LOSS_TYPES == fa.PREFERENCE_LOSS_TYPES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute"):
            fa.NOT_A_NAME


@pytest.mark.parametrize("module", [fa.PreferenceLoss, fa.LinearPreferenceLoss])
@pytest.mark.parametrize("kw,err,match", [
    (dict(bta=0.1), TypeError, "unknown option 'bta'; did you mean 'beta'"),
    (dict(loss_type="sigmod"), ValueError, "did you mean 'sigmoid'"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing=0.1 does not apply"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing must lie in \\[0, 0.5\\) for loss_type 'robust'"),
    (dict(f_divergence="js"), ValueError, "f_divergence"),
    (dict(discopop_tau=0.0), ValueError, "discopop_tau"),
])
def test_modules_validate_their_configuration_at_construction(module, kw, err, match):
    with pytest.raises(err, match=match):
        module(**kw)


def test_the_options_record_holds_preference_loss_defaults():
    """PreferenceOptions, which the modules and trainer profiles check, has preference_loss's options and defaults."""
    from dataclasses import fields

    from fastalign.preference import PreferenceOptions

    params = inspect.signature(fa.preference_loss).parameters
    options = {f.name: f.default for f in fields(PreferenceOptions)}
    assert options == {name: p.default for name, p in params.items() if p.kind is p.KEYWORD_ONLY
                       and name in options}
    assert set(params) - set(options) == {"chosen_logprobs", "rejected_logprobs", "ref_chosen_logprobs",
                                          "ref_rejected_logprobs", "chosen_lengths", "rejected_lengths",
                                          "chosen_nll", "kto_kl", "pair_weights"}
