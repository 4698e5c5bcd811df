"""Regressions of the preference losses found by user testing: option values checked by name (loss_weights,
bco_delta, the unpaired class weights, wpo_weights' cap, empty KL estimates, label_smoothing, loss_type, f_alpha,
use_weighting), a reference head given without reference hidden states, the reference pass's errors naming the
reference arguments, position_ids that do not match num_sequences, f_length_average and smoothed_losses where
nothing reads them, the empty unpaired batch, exponentials past float32's range (forward KL, the α-divergence,
discopop, alphapo: no capped exponent), and the TRL profiles' own argument checks (KTO's KL completions and labels,
errors that name the profile's arguments), PreferenceLoss.forward refusing options. Oracles: float64 formulas
written here."""
import copy
import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import fastalign as fa
from fastalign.integrations.trl import preference as trl_profiles
from fastalign.preference import unpaired_preference_loss

D = torch.float64
NAN, INF = math.nan, math.inf


def _pairs(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randn(B, generator=g, dtype=D) - 20.0
    lr = torch.randn(B, generator=g, dtype=D) - 22.0
    lc0 = lc + torch.randn(B, generator=g, dtype=D)
    lr0 = lr + torch.randn(B, generator=g, dtype=D)
    return lc, lr, lc0, lr0


def _raises(exc, name, fn):
    with pytest.raises(exc, match=re.escape(name)):
        fn()


# ------------------------------------------------------------------ option values are checked by name

_LC, _LR = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -4.5])
_DES = torch.tensor([True, False])
_P, _U = fa.preference_loss, unpaired_preference_loss

BAD_OPTIONS = {
    "loss_weights=[nan]": (ValueError, "loss_weights", lambda: _P(_LC, _LR, loss_weights=[NAN])),
    "loss_weights=[inf]": (ValueError, "loss_weights", lambda: _P(_LC, _LR, loss_weights=[INF])),
    "loss_weights=['a']": (TypeError, "loss_weights", lambda: _P(_LC, _LR, loss_weights=["a"])),
    "loss_weights=1.0": (TypeError, "loss_weights", lambda: _P(_LC, _LR, loss_weights=1.0)),
    "PreferenceLoss(loss_weights=[nan])": (ValueError, "loss_weights", lambda: fa.PreferenceLoss(loss_weights=[NAN])),
    "bco_delta=nan": (ValueError, "bco_delta", lambda: _P(_LC, _LR, _LC, _LR, loss_type="bco_pair", bco_delta=NAN)),
    "bco_delta=inf": (ValueError, "bco_delta", lambda: _P(_LC, _LR, _LC, _LR, loss_type="bco_pair", bco_delta=INF)),
    "bco_delta='0.1'": (TypeError, "bco_delta",
                        lambda: _P(_LC, _LR, _LC, _LR, loss_type="bco_pair", bco_delta="0.1")),
    "bco_delta=None": (TypeError, "bco_delta", lambda: _P(_LC, _LR, _LC, _LR, loss_type="bco_pair", bco_delta=None)),
    "bco_delta of shape (5,)": (ValueError, "bco_delta",
                                lambda: _P(_LC, _LR, _LC, _LR, loss_type="bco_pair", bco_delta=torch.ones(5))),
    "bco_delta complex": (TypeError, "bco_delta",
                          lambda: _P(_LC, _LR, _LC, _LR, loss_type="bco_pair", bco_delta=torch.tensor(1j))),
    "PreferenceLoss(bco_delta=nan)": (ValueError, "bco_delta",
                                      lambda: fa.PreferenceLoss(loss_type="bco_pair", bco_delta=NAN)),
    "unpaired desirable_weight=nan": (ValueError, "desirable_weight", lambda: _U(_LC, _LR, _DES, desirable_weight=NAN)),
    "unpaired undesirable_weight=inf": (ValueError, "undesirable_weight",
                                        lambda: _U(_LC, _LR, _DES, undesirable_weight=INF)),
    "unpaired desirable_weight='x'": (TypeError, "desirable_weight", lambda: _U(_LC, _LR, _DES, desirable_weight="x")),
    "wpo_weights cap=-1": (ValueError, "cap", lambda: fa.wpo_weights(_LC, _LR, cap=-1)),
    "wpo_weights cap=0": (ValueError, "cap", lambda: fa.wpo_weights(_LC, _LR, cap=0)),
    "wpo_weights cap=nan": (ValueError, "cap", lambda: fa.wpo_weights(_LC, _LR, cap=NAN)),
    "wpo_weights cap='a'": (TypeError, "cap", lambda: fa.wpo_weights(_LC, _LR, cap="a")),
    "kto_kl empty": (ValueError, "kto_kl", lambda: _P(_LC, _LR, _LC, _LR, loss_type="kto", kto_kl=torch.empty(0))),
    "unpaired kto_kl empty": (ValueError, "kto_kl", lambda: _U(_LC, _LR, _DES, kto_kl=torch.empty(0))),
    "label_smoothing='a'": (TypeError, "label_smoothing", lambda: _P(_LC, _LR, label_smoothing="a")),
    "label_smoothing=None": (TypeError, "label_smoothing", lambda: _P(_LC, _LR, label_smoothing=None)),
    "loss_type=None": (TypeError, "loss_type", lambda: _P(_LC, _LR, loss_type=None)),
    "loss_type=3": (TypeError, "loss_type", lambda: _P(_LC, _LR, loss_type=3)),
    "loss_type=[['sigmoid']]": (TypeError, "loss_type", lambda: _P(_LC, _LR, loss_type=[["sigmoid"]])),
    "smoothed_losses=3": (TypeError, "smoothed_losses",
                          lambda: _P(_LC, _LR, loss_type="robust", label_smoothing=0.1, smoothed_losses=3)),
    "f_alpha='x'": (TypeError, "f_alpha", lambda: _P(_LC, _LR, f_divergence="alpha_divergence", f_alpha="x")),
    "use_weighting='no'": (TypeError, "use_weighting", lambda: fa.LinearPreferenceLoss(use_weighting="no")),
    "use_weighting=1": (TypeError, "use_weighting", lambda: fa.LinearPreferenceLoss(use_weighting=1)),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_option_values_raise_naming_them(case):
    """A NaN / inf / negative result or an error that does not name the option, before: now a ValueError /
    TypeError whose message names it (the sibling options were checked already)."""
    exc, name, fn = BAD_OPTIONS[case]
    _raises(exc, name, fn)


def test_bco_delta_numbers_and_tensors_match_the_formula():
    """bco_delta as a number, a 0-dim tensor, one value per pair or an integer tensor: the float64 formula
    ``-log σ(β dc - δ) - log σ(-(β dr - δ))``; NaN is refused by name."""
    lc, lr, lc0, lr0 = _pairs()
    beta = 0.3
    for delta in (0.25, torch.tensor(0.25, dtype=D), torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=D),
                  torch.tensor([1, 0, -1, 2])):
        loss, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type="bco_pair", beta=beta, bco_delta=delta)
        d = torch.as_tensor(delta, dtype=D)
        want = (-F.logsigmoid(beta * (lc - lc0) - d) - F.logsigmoid(-(beta * (lr - lr0) - d))).mean()
        assert_close(loss, want, atol=1e-12, what=f"bco_pair, bco_delta={delta}")
    _raises(ValueError, "bco_delta", lambda: fa.preference_loss(lc, lr, lc0, lr0, loss_type="bco_pair",
                                                                 bco_delta=NAN))


def test_wpo_weights_cap():
    """A cap > 0 clamps ``exp(w_c + w_r)`` (float64 formula); 0, a negative or NaN cap raises (it gave zero,
    negative or NaN pair weights)."""
    c, r = torch.tensor([-0.1, 0.5], dtype=D), torch.tensor([0.2, 0.4], dtype=D)
    assert_close(fa.wpo_weights(c, r, cap=1.5), torch.exp(c + r).clamp(max=1.5), atol=0, what="capped")
    assert_close(fa.wpo_weights(c, r, cap=None), torch.exp(c + r), atol=0, what="uncapped")
    for cap in (0, -1.0, NAN):
        _raises(ValueError, "cap", lambda: fa.wpo_weights(c, r, cap=cap))


def test_empty_kl_estimate_raises_for_a_batch_and_not_for_an_empty_batch():
    """An empty KL estimate made the KTO loss NaN; it raises now, naming it. An empty batch still gives 0."""
    lc, lr, lc0, lr0 = _pairs()
    _raises(ValueError, "kto_kl", lambda: fa.preference_loss(lc, lr, lc0, lr0, loss_type="kto", kto_kl=torch.empty(0)))
    des = torch.tensor([True, False, True, False])
    _raises(ValueError, "kto_kl", lambda: unpaired_preference_loss(lc, lc0, des, kto_kl=torch.empty(0)))
    e = torch.empty(0, dtype=D)
    assert fa.preference_loss(e, e, e, e, loss_type="kto", kto_kl=e)[0].item() == 0.0
    assert unpaired_preference_loss(e, e, torch.empty(0, dtype=torch.bool), kto_kl=e)[0].item() == 0.0


# ------------------------------------------------------------------ the unpaired loss of an empty batch

@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_unpaired_loss_of_an_empty_batch_is_zero(loss_type):
    """``unpaired_preference_loss`` of no responses: loss 0 and an empty gradient, as ``preference_loss`` (it was
    NaN, the mean of nothing); a batch still gives the float64 class-weighted mean."""
    x = torch.empty(0, dtype=D, requires_grad=True)
    loss, _ = unpaired_preference_loss(x, torch.empty(0, dtype=D), torch.empty(0, dtype=torch.bool),
                                       loss_type=loss_type)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and g.shape == (0,)
    lp, lp0 = torch.tensor([-3.0, -4.0, -2.5], dtype=D), torch.tensor([-3.5, -3.0, -2.0], dtype=D)
    des = torch.tensor([True, False, False])
    loss, _ = unpaired_preference_loss(lp, lp0, des, loss_type=loss_type, beta=0.4, desirable_weight=1.3,
                                       undesirable_weight=0.6)
    x = lp - lp0
    z0 = x.mean().clamp(min=0) if loss_type == "kto" else torch.zeros((), dtype=D)
    good, bad = 1 - torch.sigmoid(0.4 * (x - z0)), 1 - torch.sigmoid(0.4 * (z0 - x))
    assert_close(loss, torch.where(des, 1.3 * good, 0.6 * bad).mean(), atol=1e-12, what="class-weighted mean")


# ------------------------------------------------------------------ f_length_average and smoothed_losses

def test_f_length_average_off_its_default_needs_ipo_or_sigmoid_norm():
    """f_length_average changed nothing on the other rows and was accepted; it raises now, naming it (function and
    modules), and stays accepted at its default. On ipo it is the float64 ``f(x)/|y|`` (forward KL)."""
    lc, lr, lc0, lr0 = _pairs()
    lc0, lr0 = lc + (lc0 - lc) / 4, lr + (lr0 - lr) / 4
    n = torch.tensor([3.0, 5.0, 4.0, 7.0], dtype=D)
    kw = dict(f_divergence="forward_kl", chosen_lengths=n, rejected_lengths=n)
    for types in ("sigmoid", ["sigmoid", "hinge"], "discopop"):
        _raises(ValueError, "f_length_average", lambda: fa.preference_loss(lc, lr, lc0, lr0, loss_type=types,
                                                                          f_length_average="score", **kw))
        fa.preference_loss(lc, lr, lc0, lr0, loss_type=types, f_length_average="log_ratio", **kw)
    _raises(ValueError, "f_length_average", lambda: fa.PreferenceLoss("sigmoid", f_length_average="score"))
    _raises(ValueError, "f_length_average", lambda: fa.LinearPreferenceLoss("hinge", f_length_average="score"))
    beta = 0.2
    loss, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", "ipo"], beta=beta, f_length_average="score",
                                 **kw)
    f = lambda x: 1.0 - torch.exp(-x)  # noqa: E731
    dc, dr = f(lc - lc0), f(lr - lr0)
    want = (-F.logsigmoid(beta * (dc - dr)) + (dc / n - dr / n - 1 / (2 * beta)) ** 2).mean()
    assert_close(loss, want, atol=1e-12, what="sigmoid + ipo with f(x)/|y|")


def test_smoothed_losses_with_no_label_smoothing_raises():
    """smoothed_losses naming a loss while label_smoothing is 0 was accepted without effect; it raises now.
    With label smoothing it is the float64 smoothed sigmoid on the named row only."""
    lc, lr, lc0, lr0 = _pairs()
    _raises(ValueError, "smoothed_losses", lambda: fa.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", "robust"],
                                                                      smoothed_losses=["robust"]))
    _raises(ValueError, "smoothed_losses", lambda: fa.PreferenceLoss(["sigmoid", "robust"], smoothed_losses="robust"))
    beta, eps = 0.1, 0.2
    loss, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", "robust"], beta=beta, label_smoothing=eps,
                                 smoothed_losses=["robust"])
    x = beta * ((lc - lc0) - (lr - lr0))
    robust = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    assert_close(loss, (-F.logsigmoid(x) + robust).mean(), atol=1e-12, what="sigmoid plain + robust smoothed")


@pytest.mark.parametrize("config,score,smoothed", [
    (dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"), False, False),
    (dict(loss_type=["hinge", "robust"], f_divergence_type="js_divergence"), False, False),
    (dict(loss_type=["sigmoid", "ipo"], f_divergence_type="forward_kl"), True, False),
    (dict(loss_type=["sigmoid_norm"]), True, False),
    (dict(loss_type=["robust", "sigmoid"], label_smoothing=0.1), False, True),
])
def test_dpo_profile_passes_only_the_options_its_rows_read(config, score, smoothed):
    """The DPOTrainer profile passed f_length_average="score" and smoothed_losses to every loss list; it passes them
    where a row reads them (ipo / sigmoid_norm; label smoothing > 0), so every profile builds a PreferenceLoss."""
    opts = trl_profiles.dpo_options(config)
    assert ("f_length_average" in opts) == score and ("smoothed_losses" in opts) == smoothed, opts
    if score:
        assert opts["f_length_average"] == "score"
    fa.PreferenceLoss(**opts)
    trl_profiles.dpo_preference_loss(config)


# ------------------------------------------------------------------ position_ids against num_sequences

def test_position_ids_that_do_not_match_num_sequences_raise():
    """position_ids describing 3 sequences with num_sequences 2 dropped the third, with 5 invented two empty ones,
    and position_ids not starting at 0 dropped the first tokens; each raises now on eager CPU tensors, naming
    num_sequences / position_ids. Matching ones give the cu_seqlens sums."""
    lp = -torch.arange(1.0, 8.0, dtype=D)
    pid = torch.tensor([0, 1, 2, 0, 1, 0, 1])
    want = fa.sequence_logprobs(lp, cu_seqlens=torch.tensor([0, 3, 5, 7])).sum
    assert_close(want, torch.tensor([-6.0, -9.0, -13.0], dtype=D), atol=0, what="cu_seqlens sums")
    assert_close(fa.sequence_logprobs(lp, position_ids=pid, num_sequences=3).sum, want, atol=0, what="position_ids")
    assert_close(fa.sequence_logprobs(lp[None], position_ids=pid[None], num_sequences=3).sum, want, atol=0,
                 what="position_ids [1, N]")
    for S in (2, 5):
        _raises(ValueError, "num_sequences", lambda: fa.sequence_logprobs(lp, position_ids=pid, num_sequences=S))
    _raises(ValueError, "position_ids", lambda: fa.sequence_logprobs(lp, position_ids=torch.tensor([4, 5, 6, 0, 1, 0, 1]),
                                                                      num_sequences=2))


def test_position_ids_that_do_not_match_give_nan_when_not_read_on_the_host():
    """Under tracing (and on a GPU) position_ids are not read on the host: a mismatch gives NaN sums, never
    plausible wrong ones (as a malformed cu_seqlens)."""
    seq = torch.compile(lambda x, p: fa.sequence_logprobs(x, position_ids=p, num_sequences=2).sum, fullgraph=True,
                        backend="aot_eager")
    good = seq(torch.ones(6), torch.tensor([0, 1, 0, 1, 2, 3]))
    assert torch.equal(good, torch.tensor([2.0, 4.0]))
    assert torch.isnan(seq(torch.ones(6), torch.tensor([0, 1, 0, 1, 0, 1]))).all()  # 3 sequences
    assert torch.isnan(seq(torch.ones(6), torch.tensor([2, 3, 0, 1, 0, 1]))).all()  # not starting at 0


@pytest.mark.gpu
def test_cuda_position_ids_are_checked_without_host_sync():
    dev = "cuda"
    ones = torch.ones(6, device=dev)
    # made before the check: a copy from pageable host memory synchronises
    good_pos, bad_pos = torch.tensor([0, 1, 0, 1, 2, 3], device=dev), torch.tensor([0, 1, 0, 1, 0, 1], device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        good = fa.sequence_logprobs(ones, position_ids=good_pos, num_sequences=2).sum
        bad = fa.sequence_logprobs(ones, position_ids=bad_pos, num_sequences=2).sum
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert good.tolist() == [2.0, 4.0] and torch.isnan(bad).all()


# ------------------------------------------------------------------ LinearPreferenceLoss: the reference head

B, T, H, V = 2, 5, 8, 13


def _linear_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, 0] = -100
    return g, h, w, y


def _seq_logprobs64(h, w, b, y):
    logits = h.double() @ w.double().T + (0.0 if b is None else b.double())
    lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return torch.where(y != -100, lp, torch.zeros_like(lp)).sum(-1)


def test_reference_head_without_reference_hidden_states_raises():
    """ref_weight / ref_bias without ref_hidden were ignored (a reference-free loss); they raise now. With
    ref_hidden they make the reference: the float64 DPO loss of the two heads' log-probs."""
    g, h, w, y = _linear_batch()
    mod = fa.LinearPreferenceLoss(beta=0.1)
    rw, rb = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g)
    for kw in (dict(ref_weight=rw), dict(ref_bias=rb),
               dict(ref_weight=rw, ref_chosen_logprobs=torch.zeros(B), ref_rejected_logprobs=torch.zeros(B))):
        _raises(ValueError, "ref_weight / ref_bias apply to ref_hidden", lambda: mod(h, w, y, **kw))
    rh = h + 0.1 * torch.randn(h.shape, generator=g)
    loss, _ = mod(h, w, y, ref_hidden=rh, ref_weight=rw, ref_bias=rb)
    pol, ref = _seq_logprobs64(h, w, None, y), _seq_logprobs64(rh, rw, rb, y)
    want = -F.logsigmoid(0.1 * ((pol[:B] - ref[:B]) - (pol[B:] - ref[B:]))).mean()
    assert_close(loss, want, atol=1e-5, rtol=1e-5, what="DPO with a reference head")


def test_reference_pass_errors_name_the_reference_arguments():
    """Errors from the reference pass named weight / bias / labels (the head's own names); they name ref_weight,
    ref_bias and ref_hidden now, or the policy's weight / bias where the reference uses them."""
    g, h, w, y = _linear_batch()
    mod = fa.LinearPreferenceLoss()
    sep_h, sep_y = (h[:B], h[B:]), (y[:B], y[B:])
    cases = [
        (ValueError, "ref_bias", lambda: mod(h, w, y, ref_hidden=h, ref_bias=torch.ones(V + 2))),
        (ValueError, "ref_bias", lambda: mod(h, w, y, ref_hidden=h, ref_weight=w, ref_bias=torch.ones(V + 2))),
        (TypeError, "ref_weight", lambda: mod(h, w, y, ref_hidden=h, ref_weight=w.long())),
        (ValueError, "ref_weight", lambda: mod(h, w, y, ref_hidden=h, ref_weight=torch.randn(V, H + 1))),
        (TypeError, "ref_hidden", lambda: mod(h, w, y, ref_hidden=h.bfloat16())),
        (TypeError, "ref_hidden", lambda: mod(h, w, y, ref_hidden=h.bfloat16(), ref_weight=w)),
        (ValueError, "ref_hidden", lambda: mod(h, w, y, ref_hidden=h[:, :3])),
        (ValueError, "ref_hidden", lambda: mod(sep_h, w, sep_y, ref_hidden=(h[:B, :3], h[B:]))),
        (ValueError, "ref_hidden", lambda: mod(sep_h, w, sep_y, ref_hidden=(h[:B], h[B:, :, :4]))),
    ]
    for exc, name, fn in cases:
        _raises(exc, name, fn)


# ------------------------------------------------------------------ per-pair options and sorted losses

def test_a_per_pair_bco_delta_follows_its_pairs_through_the_blocks(monkeypatch):
    """A [B] bco_delta went whole into every block of the single pass (a ValueError once the logits took more
    than one block); each block takes its pairs' deltas now: the float64 formula, on one block and on
    blocks of one pair. The delta is a constant: no gradient reaches it."""
    g, h, w, y = _linear_batch()
    rh = h + 0.1 * torch.randn(h.shape, generator=g)
    delta = torch.tensor([0.1, -0.2, 0.3, 0.5][:B], dtype=torch.float32, requires_grad=True)
    pol, ref = _seq_logprobs64(h, w, None, y), _seq_logprobs64(rh, w, None, y)
    dc, dr = pol[:B] - ref[:B], pol[B:] - ref[B:]
    d64 = delta.detach().double()
    want = (-F.logsigmoid(0.1 * dc - d64) - F.logsigmoid(-(0.1 * dr - d64))).mean()
    for mib in ("64", "1e-6"):  # one block; one pair per block
        monkeypatch.setenv("FASTALIGN_BLOCK_MIB", mib)
        mod = fa.LinearPreferenceLoss(loss_type="bco_pair", bco_delta=delta, single_pass=True)
        loss, _ = mod(h, w.clone().requires_grad_(), y, ref_hidden=rh)
        assert_close(loss, want, atol=1e-5, rtol=1e-5, what=f"bco_pair with a [B] delta, FASTALIGN_BLOCK_MIB={mib}")
    loss, _ = fa.preference_loss(pol[:B], pol[B:], ref[:B], ref[B:], loss_type="bco_pair", bco_delta=delta)
    assert not loss.requires_grad


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", ["sigmoid", "aot"]])
def test_pair_weights_are_refused_by_the_sorted_losses(loss_type):
    """aot / aot_unpaired sort the batch's margins, so pair i's weight multiplied another pair's term (the loss
    changed when the batch was reordered); per-pair weights raise for them now, at the call and at
    construction (use_weighting), as TRL's DPOTrainer refuses them."""
    lc, lr, lc0, lr0 = _pairs()
    _raises(ValueError, "per-pair weights do not apply to loss_type 'aot", lambda: fa.preference_loss(
        lc, lr, lc0, lr0, loss_type=loss_type, pair_weights=torch.ones(4, dtype=D)))
    _raises(ValueError, "per-pair weights do not apply", lambda: fa.LinearPreferenceLoss(
        loss_type=loss_type, use_weighting=True))


def test_f_divergence_with_sft_alone_raises():
    """sft reads no score: with sft alone, f_divergence / f_alpha changed nothing and were accepted; they raise
    now (beside a row that reads the score they still apply)."""
    lc, lr, lc0, lr0 = _pairs()
    n = torch.full((4,), 3.0, dtype=D)
    kw = dict(chosen_lengths=n, rejected_lengths=n)
    _raises(ValueError, "f_divergence='forward_kl' does not apply to loss_type 'sft'", lambda: fa.preference_loss(
        lc, lr, lc0, lr0, loss_type="sft", f_divergence="forward_kl", **kw))
    _raises(ValueError, "f_divergence", lambda: fa.PreferenceLoss(loss_type="sft", f_divergence="alpha_divergence",
                                                                   f_alpha=0.3))
    fa.preference_loss(lc, lr, lc0, lr0, loss_type=["sigmoid", "sft"], f_divergence="forward_kl", **kw)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "simpo", "alphapo", "sft"])
def test_a_response_with_no_scored_token_counts_one_token_in_the_reference(loss_type):
    """The float64 reference divided by a zero length (NaN) where the loss, like TRL, counts it as one token;
    both agree on a batch with an empty chosen and an empty rejected response now."""
    from fastalign.reference import preference as ref
    lc, lr, lc0, lr0 = _pairs()
    lc[1], lc0[1], lr[2], lr0[2] = 0.0, 0.0, 0.0, 0.0  # empty responses sum to 0
    nc = torch.tensor([3.0, 0.0, 5.0, 2.0], dtype=D)
    nr = torch.tensor([4.0, 2.0, 0.0, 1.0], dtype=D)
    got, _ = fa.preference_loss(lc, lr, lc0, lr0, loss_type=loss_type, chosen_lengths=nc, rejected_lengths=nr)
    want, _ = ref.preference_loss(lc, lr, lc0, lr0, loss_types=(loss_type,), nc=nc, nr=nr)
    assert torch.isfinite(want)
    assert_close(got, want, atol=1e-12, what=loss_type)


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["sft"], ["cpo"], ["sigmoid", "sft"]])
def test_default_nll_of_a_batch_with_no_chosen_token(loss_type):
    """The default chosen NLL ``-Σ lc / Σ |yc|`` counts the batch's chosen tokens at least once: every chosen
    response empty (lengths 0, log-probs 0) gives an NLL of 0, not ``0 / 0``; loss, nll metric and gradient
    against the float64 reference."""
    from fastalign.reference import preference as ref
    lc, lr, lc0, lr0 = _pairs()
    lc, lc0 = torch.zeros_like(lc), torch.zeros_like(lc0)
    nc = torch.zeros(4, dtype=D)
    nr = torch.tensor([4.0, 2.0, 3.0, 1.0], dtype=D)
    a, b = lc.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    got, m = fa.preference_loss(a, b, lc0, lr0, loss_type=loss_type, rpo_alpha=0.5, chosen_lengths=nc,
                                rejected_lengths=nr)
    x, y = lc.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    want, mr = ref.preference_loss(x, y, lc0, lr0, loss_types=tuple(loss_type), rpo_alpha=0.5, nc=nc, nr=nr)
    assert float(mr["nll"]) == 0.0
    assert_close(got, want, atol=1e-12, what=f"{loss_type} loss")
    assert_close(m["nll"], mr["nll"], atol=0, what="nll")
    for g, gr in zip(torch.autograd.grad(got, (a, b), allow_unused=True),
                     torch.autograd.grad(want, (x, y), allow_unused=True)):
        zero = torch.zeros_like(lc)
        assert_close(zero if g is None else g, zero if gr is None else gr, atol=1e-12, what=f"{loss_type} gradient")


def test_orpo_nan_loss_never_comes_with_a_finite_gradient():
    """A pair of empty responses counts one token of log-prob 0 on each side: ORPO's odds are inf/inf and its
    loss NaN. The response rows have no token to carry the NaN gradient back, so it went nowhere and the step
    was finite; the NLL now carries it to the chosen tokens, from sequence log-probs and from hidden states.
    Without the empty pair the loss and gradient stay finite and equal the float64 formula."""
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(4, 5, generator=g, dtype=D) * 3).requires_grad_()
    mask = torch.ones(4, 5, dtype=D)
    mask[1], mask[3] = 0, 0  # pair 1: no chosen and no rejected token
    s = fa.sequence_logprobs(lp, mask)
    loss, _ = fa.preference_loss(s.sum[:2], s.sum[2:], loss_type="orpo", beta=0.2, chosen_lengths=s.count[:2],
                                 rejected_lengths=s.count[2:])
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isnan(loss) and torch.isnan(grad[0]).all()

    h = torch.randn(4, 5, 8, generator=g, dtype=torch.float32, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=torch.float32, requires_grad=True)
    y = torch.randint(0, 11, (4, 5), generator=g)
    y[1], y[3] = -100, -100
    loss, _ = fa.LinearPreferenceLoss(loss_type="orpo", beta=0.2)(h, w, y)
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert torch.isnan(loss) and torch.isnan(dh).any() and torch.isnan(dw).any()

    kept = lp.detach()[[0, 2]].requires_grad_()  # the finite pair alone: the formula, in float64
    loss, _ = fa.preference_loss(kept[:1].sum(1), kept[1:].sum(1), loss_type="orpo", beta=0.2,
                                 chosen_lengths=torch.full((1,), 5.0, dtype=D),
                                 rejected_lengths=torch.full((1,), 5.0, dtype=D))
    (grad,) = torch.autograd.grad(loss, kept)
    c, r = kept.detach().mean(1)
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    assert_close(loss, -kept.detach()[0].mean() - 0.2 * F.logsigmoid(log_odds), atol=1e-12, what="orpo")
    assert torch.isfinite(grad).all()


def test_orpo_odds_of_a_confident_policy_keep_float32_precision():
    """ORPO's ``log(1 - e^{l̄})`` for a mean log-prob just below 0 (a policy that is nearly sure of a response):
    taken as ``log(-expm1(l̄))`` there, it keeps float32's relative precision, where ``log1p(-exp(l̄))`` rounds
    ``e^{l̄}`` to float32's spacing near 1 (a few percent of ``1 - e^{l̄}`` at ``l̄ = -2e-6``). Loss, log-odds
    metrics and gradient of float32 inputs against the float64 formula."""
    lc = torch.tensor([-2e-5, -0.3, -3.0, -1e-6], dtype=torch.float32)
    lr = torch.tensor([-5e-5, -4e-6, -40.0, -2.0], dtype=torch.float32)
    nc = torch.tensor([10.0, 3.0, 4.0, 1.0])
    nr = torch.tensor([10.0, 2.0, 5.0, 3.0])
    a, b = lc.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    loss, m = fa.preference_loss(a, b, loss_type="orpo", beta=0.5, chosen_lengths=nc, rejected_lengths=nr)
    x, y = lc.double().requires_grad_(True), lr.double().requires_grad_(True)
    c, r = x / nc.double(), y / nr.double()
    log_odds = (c - r) - (torch.log(-torch.expm1(c)) - torch.log(-torch.expm1(r)))
    want = (-x.sum() / nc.double().sum() - 0.5 * F.logsigmoid(log_odds)).mean()
    assert_close(loss, want, atol=1e-6, rtol=1e-5, what="orpo loss")
    assert_close(m["log_odds_chosen"], log_odds.detach().mean(), atol=1e-5, rtol=1e-5, what="log_odds_chosen")
    assert_close(m["log_odds_ratio"], F.logsigmoid(log_odds).detach().mean(), atol=1e-6, rtol=1e-5,
                 what="log_odds_ratio")
    for g, gr, what in zip(torch.autograd.grad(loss, (a, b)), torch.autograd.grad(want, (x, y)), ("d lc", "d lr")):
        assert_close(g, gr, atol=1e-6, rtol=1e-4, what=what)


# ------------------------------------------------------------------ scores that exponentiate: no capped exponent

F32 = torch.float32


def _f64(x, kind, alpha):
    """The f-divergence score, in float64 (docs/math.md#preference-losses)."""
    return 1 - torch.exp(-x) if kind == "forward_kl" else (1 - torch.exp(-alpha * x)) / alpha


def _row64(loss_type, beta, dc, dr):
    d = dc - dr
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "robust":  # label smoothing 0.1
        return (-(0.9) * F.logsigmoid(beta * d) + 0.1 * F.logsigmoid(-beta * d)) / 0.8
    return (dc - dr - 1 / (2 * beta)) ** 2  # ipo, one-token responses


def _expect_rounded(got, want64, what):
    """``got`` (float32) is the float64 value rounded to float32: inf where that overflows, never a finite
    stand-in."""
    want = want64.detach().to(F32)
    torch.testing.assert_close(got.detach(), want, rtol=2e-6, atol=1e-6, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# (policy - reference) log-ratios per case, chosen then rejected; |α x| beyond 88.7 overflows float32
EXP_CASES = {
    "chosen overflows": ([-120.0, -0.5], [0.3, -1.0]),
    "rejected overflows": ([0.2, -0.5], [-120.0, -1.0]),
    "both overflow, chosen lower": ([-100.5, 0.1], [-100.0, 0.2]),
    "both overflow, rejected lower": ([-100.0, 0.1], [-100.5, 0.2]),
    "no overflow": ([-2.0, 0.5], [1.0, -0.7]),
}


@pytest.mark.parametrize("case", sorted(EXP_CASES))
@pytest.mark.parametrize("fdiv", [("forward_kl", 1.0), ("alpha_divergence", 0.5), ("alpha_divergence", -1.5)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust", "ipo"])
def test_exponentiating_f_divergence_follows_the_float64_formula(case, fdiv, loss_type):
    """forward KL and the α-divergence capped e^{-αx} at log(max float) - 1: a chosen log-ratio of -120 gave a
    finite 6e36 loss where the formula gives 6.5e50 (inf in float32), and no gradient at all on that row;
    two overflowing sides gave the same capped score (d = 0, log 2, zero gradient) where the formula's d is
    ±1.7e43. The loss and gradient are the float64 formula's rounded to float32 now."""
    kind, alpha = fdiv
    xc, xr = EXP_CASES[case]
    scale = 1.0 / abs(alpha) if kind == "alpha_divergence" else 1.0  # the same exponents for every α
    sign = -1.0 if alpha < 0 else 1.0  # α < 0 overflows for a large positive log-ratio
    g = torch.Generator().manual_seed(1)
    lc0 = -5.0 - torch.rand(2, generator=g)
    lr0 = -5.0 - torch.rand(2, generator=g)
    lc = (lc0 + sign * scale * torch.tensor(xc)).requires_grad_()
    lr = (lr0 + sign * scale * torch.tensor(xr)).requires_grad_()
    kw = dict(loss_type=loss_type, beta=0.1, f_divergence=kind, f_alpha=alpha)
    n = torch.ones(2)
    if loss_type == "robust":
        kw["label_smoothing"] = 0.1
    if loss_type == "ipo":
        kw.update(chosen_lengths=n, rejected_lengths=n)
    loss, _ = fa.preference_loss(lc, lr, lc0, lr0, **kw)
    assert loss.dtype == F32
    gc, gr = torch.autograd.grad(loss, (lc, lr))

    c64, r64 = lc.detach().double().requires_grad_(), lr.detach().double().requires_grad_()
    dc, dr = _f64(c64 - lc0.double(), kind, alpha), _f64(r64 - lr0.double(), kind, alpha)
    want = _row64(loss_type, 0.1, dc, dr).mean()
    wc, wr = torch.autograd.grad(want, (c64, r64))
    assert torch.isfinite(want) and torch.isfinite(wc).all() and torch.isfinite(wr).all()  # float64 holds it
    _expect_rounded(loss, want, "loss")
    _expect_rounded(gc, wc, "d loss / d chosen")
    _expect_rounded(gr, wr, "d loss / d rejected")


@pytest.mark.parametrize("tau,x", [(0.05, -120.0), (1.0, -100.0), (2.0, -200.0), (2.0, -50.0), (0.05, 3.0)])
def test_discopop_exponential_term_is_exact(tau, x):
    """discopop's w e^{-x} capped e^{-x}: with τ = 1 at x = -100 it gave about 4e-6 for a term that is 1, with τ = 2
    at x = -200 a finite 4e-6 for one that overflows float32 (2.7e43), both with no gradient. exp(log σ(x/τ) - x)
    is the float64 formula's value and gradient rounded to float32 now, and at τ = 0.05, x = -120 the exact
    limit 0 of the term, where float32's σ · exp gives 0 · inf."""
    beta = 1.0
    lc = torch.tensor([x, 0.3], requires_grad=True)
    lr = torch.zeros(2)
    loss, _ = fa.preference_loss(lc, lr, torch.zeros(2), torch.zeros(2), loss_type="discopop", beta=beta,
                                 discopop_tau=tau)
    (g,) = torch.autograd.grad(loss, lc)
    c64 = lc.detach().double().requires_grad_()
    d = beta * c64
    w = torch.sigmoid(d / tau)
    want = ((1 - w) * (-F.logsigmoid(d)) + w * torch.exp(-d)).mean()
    (wg,) = torch.autograd.grad(want, c64)
    assert torch.isfinite(want)
    _expect_rounded(loss, want, "loss")
    _expect_rounded(g, wg, "gradient")


def test_alphapo_reward_is_not_capped():
    """alphapo's reward (1 - e^{-α l̄})/α capped the exponent too: two mean log-probs past -88.7/α got the same
    reward (loss log σ(-γ)-like, zero gradient) where the formula separates them by ~e^{102}. Float64 now."""
    lc = torch.tensor([-20.0, -1.0], requires_grad=True)
    lr = torch.tensor([-20.5, -1.2], requires_grad=True)
    n = torch.ones(2)
    kw = dict(loss_type="alphapo", beta=0.5, alphapo_alpha=5.0, simpo_gamma=0.5, chosen_lengths=n,
              rejected_lengths=n)
    loss, _ = fa.preference_loss(lc, lr, **kw)
    gc, gr = torch.autograd.grad(loss, (lc, lr))
    c64, r64 = lc.detach().double().requires_grad_(), lr.detach().double().requires_grad_()
    reward = lambda lbar: (1 - torch.exp(-5.0 * lbar)) / 5.0  # noqa: E731
    want = (-F.logsigmoid(0.5 * (reward(c64) - reward(r64)) - 0.5)).mean()
    wc, wr = torch.autograd.grad(want, (c64, r64))
    _expect_rounded(loss, want, "loss")
    _expect_rounded(gc, wc, "d loss / d chosen")
    _expect_rounded(gr, wr, "d loss / d rejected")


def test_dpo_profile_forward_kl_overflow_is_inf_with_its_gradient():
    """DPOLoss (forward_kl, float32 per-token log-probs) with a chosen log-ratio of -120 gave a finite 6e36 loss and
    an exactly zero gradient on that row; the float64 formula is 6.5e50 with gradient -6.5e50 per token: inf and
    -inf in float32 now. The other rows keep the formula's finite gradient."""
    mask = torch.ones(4, 3)
    lp = torch.full((4, 3), -1.0)
    lp[0] = -41.0  # chosen pair 0: log-ratio 3 × -40
    ref = torch.full((4, 3), -1.0)
    a = lp.clone().requires_grad_()
    loss, _ = trl_profiles.DPOLoss(dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"))(a, mask, ref)
    (g,) = torch.autograd.grad(loss, a)
    b = lp.double().requires_grad_()
    x = b.sum(1) - ref.double().sum(1)
    f = 1 - torch.exp(-x)
    want = -F.logsigmoid(0.1 * (f[:2] - f[2:])).mean()
    (wg,) = torch.autograd.grad(want, b)
    _expect_rounded(loss, want, "loss")
    _expect_rounded(g, wg, "gradient")
    assert torch.isinf(loss) and (g[0] == -math.inf).all() and torch.isfinite(g[1:]).all()


# ------------------------------------------------------------------ the TRL profiles check their own arguments

def _kto(loss_type="kto"):
    return trl_profiles.KTOLoss(dict(loss_type=loss_type, beta=0.5))


def test_kto_profile_checks_the_kl_completions_shapes():
    """kl_logps [4] against ref_kl_logps [1] broadcast to a wrong KL baseline, [4, 1] against [4] to a [4, 4] outer
    difference, [3] against [4] failed inside torch: each is a ValueError naming the argument now. The KL
    completions may number other than the responses (every process's)."""
    lp, mask = -torch.rand(4, 5), torch.ones(4, 5)
    label, ref = torch.tensor([True, False, True, True]), -torch.rand(4) * 5
    kl = torch.tensor([-3.0, -4.0, -5.0, -6.0])
    kto = _kto()
    for exc, name, kw in [
        (ValueError, "ref_kl_logps must have shape (4,)", dict(kl_logps=kl, ref_kl_logps=torch.tensor([-6.0]))),
        (ValueError, "kl_logps must have 1 dimension", dict(kl_logps=kl[:, None], ref_kl_logps=kl - 1)),
        (ValueError, "ref_kl_logps must have shape (3,)", dict(kl_logps=kl[:3], ref_kl_logps=kl)),
        (ValueError, "kl_logps must hold at least one value", dict(kl_logps=kl[:0], ref_kl_logps=kl[:0])),
        (TypeError, "kl_logps must be a floating tensor", dict(kl_logps=kl.long(), ref_kl_logps=kl)),
        (TypeError, "ref_kl_logps must be a floating tensor", dict(kl_logps=kl, ref_kl_logps=kl.long())),
    ]:
        _raises(exc, name, lambda: kto(lp, mask, label, ref, **kw))
    # eight KL completions (two processes' worth) for four responses: their mean difference, clamped at 0
    kl8, ref8 = torch.linspace(-6, -2, 8), torch.linspace(-7, -2.5, 8)
    _, metrics = kto(lp, mask, label, ref, kl8, ref8)
    assert_close(metrics["kl"], (kl8.double() - ref8.double()).mean().clamp(min=0), atol=1e-6, what="kl")


def test_kto_profile_labels_are_bool_or_zero_one():
    """A label of 2 counted as desirable though the docstring says bool or 0/1; it raises a ValueError naming label
    where the values are on the host (a list, a CPU tensor). 0/1 integers give the bool labels' loss."""
    lp, mask, ref = -torch.rand(4, 5), torch.ones(4, 5), -torch.rand(4) * 5
    kto = _kto("apo_zero_unpaired")
    for label in ([2, 0, 1, 0], torch.tensor([2, 0, 1, 0]), torch.tensor([0, -1, 1, 0], dtype=torch.int32)):
        _raises(ValueError, "label must be bool (or 0/1 integers)", lambda: kto(lp, mask, label, ref))
    _raises(TypeError, "label must be bool", lambda: kto(lp, mask, torch.tensor([1.0, 0.0, 1.0, 0.0]), ref))
    _raises(ValueError, "label must have shape (4,)", lambda: kto(lp, mask, torch.tensor([True, False]), ref))
    want, _ = kto(lp, mask, torch.tensor([True, False, True, False]), ref)
    for label in ([1, 0, 1, 0], torch.tensor([1, 0, 1, 0], dtype=torch.uint8)):
        got, _ = kto(lp, mask, label, ref)
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_kto_profile_reads_no_cuda_label_on_the_host():
    """A CUDA label is not read on the host (its values would synchronise): no sync, and a nonzero integer counts
    as desirable, as KTOTrainer's cast to bool."""
    dev = "cuda"
    lp, mask, ref = -torch.rand(4, 5, device=dev), torch.ones(4, 5, device=dev), -torch.rand(4, device=dev)
    kto = _kto("apo_zero_unpaired")
    label = torch.tensor([2, 0, 1, 0], device=dev)  # made before the check: the copy from the host synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got, _ = kto(lp, mask, label, ref)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want, _ = kto(lp, mask, torch.tensor([True, False, True, False], device=dev), ref)
    assert torch.equal(got, want)


def test_profile_errors_name_the_profiles_own_arguments():
    """The profiles' errors named internal arguments (sum_p2, token_logprobs, ref_chosen_logprobs, ref_logprobs,
    logprobs, desirable) or blamed the mask for a mis-shaped ref_per_token_logps; they name the argument the caller
    passed now."""
    lp, m, ref = -torch.rand(4, 5), torch.ones(4, 5), -torch.rand(4, 5)
    dpo, wpo = trl_profiles.DPOLoss(), trl_profiles.DPOLoss(dict(use_weighting=True))
    kto = _kto("apo_zero_unpaired")
    label = torch.tensor([True, False, True, True])
    cases = [
        (ValueError, "log_sum_sq_probs must have shape (4, 5)", lambda: wpo(lp, m, ref, log_sum_sq_probs=lp[:, :4])),
        (TypeError, "log_sum_sq_probs must be a floating tensor",
         lambda: wpo(lp, m, ref, log_sum_sq_probs=lp.long())),
        (ValueError, "ref_per_token_logps must have shape (4, 5)", lambda: dpo(lp, m, ref[:, :4])),
        (TypeError, "ref_per_token_logps must be a floating tensor", lambda: dpo(lp, m, ref.long())),
        (ValueError, "completion_mask must have shape (4, 5)", lambda: dpo(lp, m[:, :4], ref)),
        (TypeError, "per_token_logps must be a floating tensor", lambda: dpo(lp.long(), m, ref)),
        (ValueError, "per_token_logps must have 2 dimension", lambda: dpo(lp[0], m, ref)),
        (ValueError, "ref_chosen_logps must have shape (2,)",
         lambda: dpo(lp, m, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(2))),
        (ValueError, "ref_rejected_logps must have shape (2,)",
         lambda: dpo(lp, m, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2, 1))),
        (ValueError, "give both ref_chosen_logps and ref_rejected_logps",
         lambda: dpo(lp, m, ref_chosen_logps=torch.zeros(2))),
        (ValueError, "ref_logps must have shape (4,)", lambda: kto(lp, m, label, torch.zeros(3))),
        (TypeError, "ref_logps must be a floating tensor", lambda: kto(lp, m, label, torch.zeros(4).long())),
        (TypeError, "per_token_logps must be a floating tensor", lambda: kto(lp.long(), m, label, torch.zeros(4))),
        (ValueError, "completion_mask must have shape (4, 5)",
         lambda: trl_profiles.CPOLoss()(lp, m[:, :4])),
        (ValueError, "nll_mask must have shape (4, 5)", lambda: trl_profiles.ORPOLoss()(lp, m, m[:3])),
    ]
    for exc, message, fn in cases:
        _raises(exc, message, fn)


# ------------------------------------------------------------------ PreferenceLoss.forward: the batch's tensors

def test_preference_loss_module_forward_takes_the_batch_tensors_only():
    lc, lr, lc0, lr0 = _pairs(seed=7)
    nc, nr = torch.tensor([3.0, 5.0, 2.0, 4.0], dtype=D), torch.tensor([4.0, 2.0, 6.0, 3.0], dtype=D)
    w = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=D)
    beta = 0.3
    mod = fa.PreferenceLoss("ipo", beta=beta)
    loss, _ = mod(lc, lr, lc0, lr0, chosen_lengths=nc, rejected_lengths=nr, pair_weights=w)
    want = (w * ((lc - lc0) / nc - (lr - lr0) / nr - 1 / (2 * beta)) ** 2).mean()
    assert_close(loss, want, atol=1e-10, rtol=1e-10, what="ipo with per-batch lengths and weights")
    kl = torch.tensor([0.4, -0.1, 0.3], dtype=D)  # kto: z0 = sg(max(mean KL, 0)), here 0.2
    loss, _ = fa.PreferenceLoss("kto", beta=beta)(lc, lr, lc0, lr0, kto_kl=kl)
    z0 = kl.mean().clamp(min=0)
    want = (0.5 * ((1 - torch.sigmoid(beta * (lc - lc0 - z0))) + (1 - torch.sigmoid(beta * (z0 - (lr - lr0)))))).mean()
    assert_close(loss, want, atol=1e-10, rtol=1e-10, what="kto with a per-batch KL")
    # an option, set at construction or not, is not a per-call argument
    for name, value in (("beta", 0.5), ("f_divergence", "forward_kl"), ("label_smoothing", 0.1),
                        ("loss_type", "sigmoid")):
        with pytest.raises(TypeError, match=rf"^PreferenceLoss\.forward got the option '{name}': the options are "
                                            rf"fixed at construction"):
            mod(lc, lr, lc0, lr0, chosen_lengths=nc, rejected_lengths=nr, **{name: value})
    _raises(TypeError, "did you mean 'chosen_lengths'", lambda: mod(lc, lr, lc0, lr0, chosen_length=nc))


def test_linear_preference_loss_repr_shows_every_option_set():
    """Two differently configured modules print differently: every option away from its default is shown."""
    plain = fa.LinearPreferenceLoss("sigmoid", beta=0.1)
    assert repr(plain) == "LinearPreferenceLoss(loss_type='sigmoid', beta=0.1, label_smoothing=0.0)"
    tuned = fa.LinearPreferenceLoss("sigmoid", beta=0.1, temperature=0.7, softcap=30.0, ignore_index=-1,
                                    single_pass=False, compact=True, ld_alpha=0.5)
    for shown in ("temperature=0.7", "softcap=30.0", "ignore_index=-1", "single_pass=False", "compact=True",
                  "ld_alpha=0.5"):
        assert shown in repr(tuned), (shown, repr(tuned))
    assert "logit_scale" not in repr(tuned) and "backend" not in repr(tuned)


def test_sequence_logprobs_weighs_by_a_fractional_mask():
    """A fractional response_mask weighs every per-sequence quantity: the mean divides the weighted sum by the
    weighted count (also below 1) and the WPO log-weight is the same weighted mean of lp - log sum p^2, as TRL's
    (per_token_logps_adjusted * completion_mask).sum(-1) / completion_mask.sum(-1)."""
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 3
    sum_p2 = torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.5 + 0.1
    m = torch.tensor([[0.5, 0.5, 0.5, 0.0], [0.2, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    out = fa.sequence_logprobs(lp.float(), m.float(), sum_p2=sum_p2.float())
    count = m.sum(-1)
    safe = torch.where(count > 0, count, torch.ones_like(count))
    assert_close(out.mean, (m * lp).sum(-1) / safe, atol=1e-6, rtol=1e-6, what="weighted mean")
    assert_close(out.wpo, (m * (lp - sum_p2.log())).sum(-1) / safe, atol=1e-6, rtol=1e-6, what="weighted wpo")


def test_sequence_logprobs_ignore_index_needs_labels():
    """``ignore_index`` builds the mask from ``labels``: given without them (a mask or no mask) it was ignored
    without a word. It raises naming ``ignore_index`` now; with labels it masks (float64 plain sums)."""
    lp = -torch.rand(2, 5, generator=torch.Generator().manual_seed(2), dtype=D)
    labels = torch.tensor([[-1, 3, 4, -1, 2], [5, -1, -1, 1, 0]])
    for mask in (torch.ones(2, 5), None):
        with pytest.raises(ValueError, match="ignore_index applies with labels"):
            fa.sequence_logprobs(lp.float(), mask, ignore_index=-1)
        fa.sequence_logprobs(lp.float(), mask, ignore_index=-100)  # the default, given: accepted
    got = fa.sequence_logprobs(lp.float(), labels=labels, ignore_index=-1)
    assert_close(got.sum, (lp * (labels != -1)).sum(-1), atol=1e-6, what="labels with ignore_index")


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo", "alphapo", "sft", ["simpo", "sft"]])
def test_reference_free_rows_take_the_reference_for_the_metrics_only(loss_type):
    """The reference-free rows read no reference log-probs: given (as TRL's DPOTrainer gives them with sft),
    the loss and its gradient are those without them, and only ``rewards/*`` change, to β(l - l0) (float64
    plain torch), as documented."""
    lc, lr, lc0, lr0 = _pairs()
    n = torch.tensor([3.0, 5.0, 2.0, 4.0], dtype=D)
    kw = dict(loss_type=loss_type, beta=0.3, chosen_lengths=n, rejected_lengths=n)
    out = []
    for refs in ((), (lc0, lr0)):
        c, r = lc.clone().requires_grad_(True), lr.clone().requires_grad_(True)
        loss, met = fa.preference_loss(c, r, *refs, **kw)
        grads = torch.autograd.grad(loss, (c, r), allow_unused=True)  # sft reads no rejected log-prob
        out.append((loss, [torch.zeros_like(lc) if x is None else x for x in grads], met))
    (l0, g0, m0), (l1, g1, m1) = out
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    rc, rr = 0.3 * (lc - lc0), 0.3 * (lr - lr0)
    for name, want in (("rewards/chosen", rc.mean()), ("rewards/rejected", rr.mean()),
                       ("rewards/margins", (rc - rr).mean()), ("rewards/accuracies", (rc > rr).to(D).mean())):
        assert_close(m1[name], want, atol=1e-12, what=name)
    assert_close(m0["rewards/chosen"], 0.3 * lc.mean(), atol=1e-12, what="rewards/chosen without a reference")
    for name in ("logps/chosen", "logps/rejected"):
        assert torch.equal(m0[name], m1[name])


# ------------------------------------------------------------------ learned token weights; the empty packed batch

def _weighted_dpo64(h, w, y, tw, beta=0.1):
    """float64 reference-free sigmoid DPO of ``sum_t tw_t lp_t`` per sequence (rows 0..B-1 chosen)."""
    lp = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    s = (torch.where(y != -100, lp, torch.zeros_like(lp)) * tw).sum(-1)
    n = s.shape[0] // 2
    return -F.logsigmoid(beta * (s[:n] - s[n:])).mean()


def _layout(layout, h, y, tw):
    """(hidden, labels, keywords) of the concatenated batch ``h [2B, T, H]`` in ``layout``."""
    if layout == "separate":
        return (h[:B], h[B:]), (y[:B], y[B:]), dict(token_weights=(tw[:B], tw[B:]))
    if layout == "packed":
        cu = torch.arange(2 * B + 1) * T
        return h.reshape(-1, H), y.reshape(-1), dict(token_weights=tw.reshape(-1), cu_seqlens=cu)
    return h, y, dict(token_weights=tw)


@pytest.mark.parametrize("single_pass", ["auto", False])
@pytest.mark.parametrize("layout", ["concatenated", "separate", "packed"])
def test_learned_token_weights_get_their_gradient(layout, single_pass):
    """token_weights that require grad (SparsePO's learned weights) got no gradient from the single pass,
    which "auto" takes for an fp32 head on the CPU, and which reads them as constants: "auto" takes the two
    passes for them now. Loss, d token_weights and d hidden are the float64 formula's on every layout."""
    g, h, w, y = _linear_batch()
    tw = torch.rand(2 * B, T, generator=g) + 0.5
    h64, tw64 = h.double().requires_grad_(True), tw.double().requires_grad_(True)
    want = _weighted_dpo64(h64, w, y, tw64)
    want_dh, want_dtw = torch.autograd.grad(want, (h64, tw64))
    hl, twl = h.clone().requires_grad_(True), tw.clone().requires_grad_(True)
    hidden, labels, kw = _layout(layout, hl, y, twl)
    loss, _ = fa.LinearPreferenceLoss(beta=0.1, single_pass=single_pass)(hidden, w, labels, **kw)
    dh, dtw = torch.autograd.grad(loss, (hl, twl))
    assert_close(loss, want, atol=1e-5, rtol=1e-5, what=f"{layout} loss")
    assert_close(dtw, want_dtw, atol=1e-5, rtol=1e-5, what=f"{layout} d token_weights")
    assert_close(dh, want_dh, atol=1e-5, rtol=1e-5, what=f"{layout} d hidden")


def test_single_pass_is_refused_for_learned_token_weights_and_kept_for_fixed_ones():
    """single_pass=True raises naming token_weights when they require grad (under grad mode); fixed token
    weights, or any under no_grad, leave the single pass to run as before."""
    g, h, w, y = _linear_batch()
    tw = torch.rand(2 * B, T, generator=g) + 0.5
    mod = fa.LinearPreferenceLoss(beta=0.1, single_pass=True)
    hl = h.clone().requires_grad_(True)
    _raises(ValueError, "single_pass=True does not apply: token_weights",
            lambda: mod(hl, w, y, token_weights=tw.clone().requires_grad_(True)))
    _raises(ValueError, "token_weights", lambda: mod((hl[:B], hl[B:]), w, (y[:B], y[B:]),
                                                     token_weights=(tw[:B], tw[B:].clone().requires_grad_(True))))
    loss, _ = mod(hl, w, y, token_weights=tw)
    assert type(loss.grad_fn).__name__ == "_SinglePassBackward"
    paths = fa.LinearPreferenceLoss(beta=0.1).paths
    learned = tw.clone().requires_grad_(True)
    assert paths.single_passes(None, w, hl[:B], hl[B:], token_weights=(tw[:B], tw[B:]))
    assert not paths.single_passes(None, w, hl[:B], hl[B:], token_weights=(learned[:B], learned[B:]))
    with torch.no_grad():
        assert not mod(h, w, y, token_weights=learned)[0].requires_grad


@pytest.mark.parametrize("options", [{}, dict(ld_alpha=0.5, use_weighting=True), dict(loss_type="ipo")],
                         ids=["sigmoid", "ld-wpo", "ipo"])
def test_packed_batch_of_no_pairs_gives_loss_zero(options):
    """cu_seqlens = [0] ([2B+1] with B = 0) raised from sequence_logprobs; it gives loss 0 and zero gradients,
    as the concatenated and separate layouts of an empty batch (docs/bad-inputs.md), with token weights, a
    reference and packed padding past the last (here: no) sequence. Its first offset must still be 0."""
    g = torch.Generator().manual_seed(3)
    mod = fa.LinearPreferenceLoss(**options)
    for n in (0, 3):  # no token; three tokens of padding outside every sequence
        h = torch.randn(n, H, generator=g).requires_grad_(True)
        w = torch.randn(V, H, generator=g).requires_grad_(True)
        b = torch.randn(V, generator=g).requires_grad_(True)
        y = torch.randint(0, V, (n,), generator=g)
        tw = torch.rand(n, generator=g).requires_grad_(True)
        cu = torch.zeros(1, dtype=torch.long)
        for kw in (dict(), dict(token_weights=tw), dict(ref_hidden=torch.randn(n, H, generator=g))):
            loss, _ = mod(h, w, y, bias=b, cu_seqlens=cu, **kw)
            want, _ = mod(h[:0].view(0, 1, H), w, y[:0].view(0, 1), bias=b)  # the concatenated empty batch
            assert loss.item() == 0.0 and torch.equal(loss, want)
            grads = torch.autograd.grad(loss, (h, w, b))
            assert all(torch.equal(d, torch.zeros_like(d)) for d in grads)
        _raises(ValueError, "cu_seqlens must start at 0", lambda: mod(h, w, y, cu_seqlens=torch.tensor([2])))


@pytest.mark.parametrize("single_pass", [True, False, "auto"])
@pytest.mark.parametrize("grad", [True, False])
def test_a_head_of_another_dtype_than_the_hidden_states_is_refused_on_every_path(single_pass, grad):
    """bf16 hidden states with an fp32 head: the two passes refused them (linear_logprobs' head check) and the single
    pass ran, so an "auto" training step worked and its evaluation step under no_grad (the two passes) raised."""
    _, h, w, y = _linear_batch()
    loss = fa.LinearPreferenceLoss("sigmoid", single_pass=single_pass)
    hidden = h.bfloat16().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        _raises(TypeError, "weight must have the dtype of hidden (torch.bfloat16)", lambda: loss(hidden, w.float(), y))


def test_modules_keep_their_own_copy_of_list_options():
    """A list given to a loss module (loss types, loss weights, the head's chunk) is copied at construction: the
    caller changing it afterwards changes neither the module's loss nor its repr, and two modules built from one
    list share nothing."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 3, 5, generator=g), torch.randn(7, 5, generator=g)
    labels = torch.randint(0, 7, (4, 3), generator=g)
    ref = dict(ref_chosen_logprobs=torch.full((2,), -3.0), ref_rejected_logprobs=torch.full((2,), -4.0))
    types = ["sigmoid"]
    linear = fa.LinearPreferenceLoss(loss_type=types)
    before = linear(h, w, labels, **ref)[0]
    types.append("sft")
    assert torch.equal(linear(h, w, labels, **ref)[0], before) and "sft" not in repr(linear)
    types.clear()
    assert torch.equal(linear(h, w, labels, **ref)[0], before)

    weights = [1.0, 0.5]
    pairs = fa.PreferenceLoss(loss_type=["sigmoid", "sft"], loss_weights=weights)
    c, r = torch.randn(2, generator=g), torch.randn(2, generator=g)
    before = pairs(c, r, c * 0, r * 0, chosen_nll=torch.tensor(1.0))[0]
    weights[1] = 100.0
    assert torch.equal(pairs(c, r, c * 0, r * 0, chosen_nll=torch.tensor(1.0))[0], before)

    chunk = [2, 8]
    policy = fa.LinearPolicyLoss(loss_type="cispo", cispo_low=0.8, cispo_high=1.2, chunk=chunk)
    old, A, m = -torch.rand(4, 3, generator=g) * 3, torch.randn(4, 3, generator=g), torch.ones(4, 3, dtype=torch.bool)
    before = policy(h, w, labels, old, A, m)[0]
    chunk[0] = 0  # refused if the module read the caller's list
    assert torch.equal(policy(h, w, labels, old, A, m)[0], before)
    assert torch.equal(fa.LinearPolicyLoss(loss_type="cispo", cispo_low=0.8, cispo_high=1.2, chunk=(2, 8))(
        h, w, labels, old, A, m)[0], before)


@pytest.mark.parametrize("name, value", [("ignore_index", 0), ("use_weighting", True), ("wpo_cap", 2.0),
                                         ("ld_alpha", 0.5), ("config", {}), ("kernel_options", {})])
def test_linear_preference_options_are_fixed_at_construction(name, value):
    """LinearPreferenceLoss checks its options together at construction (use_weighting against the loss types,
    wpo_cap against use_weighting, ignore_index against the kernel options): assigning one afterwards raises
    naming it, where it would have taken effect in one place and not another."""
    loss = fa.LinearPreferenceLoss(loss_type="ipo")
    with pytest.raises(AttributeError, match=f"LinearPreferenceLoss.{name} is fixed at construction"):
        setattr(loss, name, value)
    assert loss.ignore_index == -100 and loss.kernel_options["ignore_index"] == -100
    loss.train(False)  # the module's own state (training, hooks, device moves) is not configuration
    loss.double()


@pytest.mark.parametrize("make, name, value, per_call", [
    (lambda: fa.PolicyLoss(loss_type="ppo"), "eps_high", 0.001, True),
    (lambda: fa.PreferenceLoss("sigmoid"), "beta", 5.0, False),
    (lambda: fa.PreferenceLoss("sigmoid"), "label_smoothing", 0.1, False),
    (lambda: fa.LinearPolicyLoss(loss_type="grpo"), "temperature", 0.5, True),
    (lambda: fa.LinearPolicyLoss(loss_type="grpo"), "kl_coef", 0.04, True),
    (lambda: fa.LinearPreferenceLoss("sigmoid"), "beta", 5.0, False),
    (lambda: fa.LinearPreferenceLoss("sigmoid"), "temperature", 0.5, False),
    (lambda: fa.LinearPreferenceLoss("sigmoid"), "single_pass", False, False),
], ids=lambda v: v if isinstance(v, str) else None)
def test_assigning_an_option_to_a_loss_module_raises(make, name, value, per_call):
    """An option assigned to a core loss module after construction raised nothing and changed nothing (a new
    attribute that the loss never read; the trainers' adapters, whose modules read theirs at each call, apply it):
    it raises naming the option and the remedy, also in a deep copy or an unpickled module."""
    loss = make()
    for module in (loss, copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        with pytest.raises(AttributeError, match=f"{type(loss).__name__}.{name} is fixed at construction") as err:
            setattr(module, name, value)
        assert ("to the call" in str(err.value)) == per_call
        assert name not in module.__dict__


def test_linear_policy_loss_attributes_read_at_each_call_stay_assignable():
    """``entropy_metric`` and ``single_pass`` are LinearPolicyLoss attributes, read (and checked) at each call."""
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 3, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (2, 3), generator=g)
    old, A, m = -torch.rand(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.ones(2, 3, dtype=torch.bool)
    loss = fa.LinearPolicyLoss(loss_type="grpo")
    assert "entropy" not in loss(h, w, labels, old, A, m)[1]
    loss.entropy_metric = True
    assert "entropy" in loss(h, w, labels, old, A, m)[1]
    loss.single_pass = "maybe"
    with pytest.raises(ValueError, match="single_pass"):
        loss(h, w, labels, old, A, m)


@pytest.mark.parametrize("dtype, mean_logprob", [(torch.float32, -1e-8), (torch.float32, -1e-30),
                                                 (torch.float64, -1e-20), (torch.float64, -1e-300)])
@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_orpo_gradient_is_finite_for_a_mean_logprob_just_below_0(dtype, mean_logprob, side):
    """ORPO's log(1 - p) took the gradient of the form it did not select, infinite near a mean log-prob of 0 (a
    very confident response), and the selection made it NaN while the loss was finite (TRL's log1mexp does the
    same); the gradient is the float64 one of the odds ratio written with log(-expm1)."""
    near, far = torch.tensor([mean_logprob], dtype=dtype), torch.tensor([-3.0], dtype=dtype)
    lc, lr = (near, far) if side == "chosen" else (far, near)
    lc, lr = lc.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    one = torch.ones(1, dtype=dtype)
    loss, _ = fa.preference_loss(lc, lr, loss_type="orpo", beta=0.1, chosen_lengths=one, rejected_lengths=one,
                                 chosen_nll=torch.zeros((), dtype=dtype))
    loss.backward()
    a, b = (t.detach().double().requires_grad_(True) for t in (lc, lr))
    want = -0.1 * F.logsigmoid((a - b) - (torch.log(-torch.expm1(a)) - torch.log(-torch.expm1(b))))
    want.backward()
    assert torch.isfinite(lc.grad).all() and torch.isfinite(lr.grad).all()
    assert_close(loss.double(), want.detach().reshape(loss.shape), rtol=1e-5, atol=0, what="loss")
    assert_close(lc.grad.double(), a.grad, rtol=1e-5, atol=0, what="d chosen")
    assert_close(lr.grad.double(), b.grad, rtol=1e-5, atol=0, what="d rejected")
