"""One name per idea in the public API: ``response_mask`` for the token mask, ``logprobs`` for
log-probs; the former names still work, with a RenamedWarning (a DeprecationWarning), and
giving both names is a TypeError. Every module checks its whole configuration at construction."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import fastalign as fa
from fastalign import _deprecate
from fastalign.advantages import masked_whiten
from fastalign.preference import unpaired_preference_loss

B, T, V, H = 3, 5, 11, 4


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 3:] = False
    return m


def _public_callables():
    """(name, callable) of every public function and every module's __init__ and forward (not the exception and
    warning classes, whose one argument is their message)."""
    out = [(n, getattr(fa, n)) for n in fa.__all__ if callable(getattr(fa, n))
           and not (inspect.isclass(getattr(fa, n)) and issubclass(getattr(fa, n), BaseException))]
    out.append(("unpaired_preference_loss", unpaired_preference_loss))
    for name, obj in list(out):
        if inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
            out.append((f"{name}.forward", obj.forward))
    return out


@pytest.mark.parametrize("name,fn", _public_callables(), ids=lambda x: x if isinstance(x, str) else "")
def test_public_signatures_use_one_name_per_idea(name, fn):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        pytest.skip(f"{name} has no Python signature")
    bad = [p for p in params if p in ("mask", "normalizer") or "logps" in p]
    assert not bad, f"{name} takes {bad}: the public names are response_mask, global_tokens and *logprobs"


def test_every_rename_points_at_an_argument():
    assert len(_deprecate.RENAMED) >= 12
    for owner, old, new in _deprecate.RENAMED:
        if owner == "PolicyConfig":  # a former (a, b) option: two named options ("cispo_low, cispo_high")
            assert all(n in fa.policy_config.FIELDS and n.startswith(old.split("_bounds")[0]) for n in new.split(", "))
            assert old not in fa.policy_config.FIELDS, (owner, old, new)
            continue
        assert old != new and ("mask" in new or "logprobs" in new or new in ("kl_type", "kl_clamp", "kto_kl",
                                                                             "pair_weights", "advantages",
                                                                             "global_tokens")), \
            (owner, old, new)


def _warns_same(old_call, new_call, match):
    with pytest.warns(DeprecationWarning, match=match) as record:
        got = old_call()
    assert all(issubclass(w.category, _deprecate.RenamedWarning) for w in record)
    want = new_call()
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for a, b in zip(got, want):
        if isinstance(b, dict):
            assert a.keys() == b.keys()
            for k in b:
                assert torch.equal(a[k], b[k]), k
        else:
            assert (a is None and b is None) or torch.equal(a, b)


def test_aggregate_loss_mask_is_response_mask():
    x, m = torch.randn(B, T, generator=_g()), _mask()
    _warns_same(lambda: fa.aggregate_loss(x, mask=m, agg="seq-mean-token-mean"),
                lambda: fa.aggregate_loss(x, response_mask=m, agg="seq-mean-token-mean"),
                r"aggregate_loss\(mask=\.\.\.\) is deprecated: use response_mask")
    with pytest.raises(TypeError, match="pass response_mask only"):
        fa.aggregate_loss(x, m, mask=m)
    with pytest.raises(TypeError, match="pass response_mask only"):
        fa.aggregate_loss(x, response_mask=m, mask=m)


def test_sequence_logprobs_token_logps_and_mask():
    lp, m = torch.randn(B, T, generator=_g(1)), _mask()
    _warns_same(lambda: fa.sequence_logprobs(token_logps=lp, mask=m),
                lambda: fa.sequence_logprobs(token_logprobs=lp, response_mask=m), "deprecated")
    # the mask given positionally is response_mask: the former keyword then names it twice
    with pytest.raises(TypeError, match="response_mask only"):
        fa.sequence_logprobs(lp, m, mask=m)


def test_masked_whiten_mask_is_response_mask():
    x, m = torch.randn(B, T, generator=_g(2)), _mask()
    _warns_same(lambda: masked_whiten(x, mask=m), lambda: fa.masked_whiten(x, response_mask=m), "use response_mask")


def test_preference_loss_logps_are_logprobs():
    lc, lr, rc, rr = torch.randn(4, B, generator=_g(3)) - 5.0
    old = dict(chosen_logps=lc, rejected_logps=lr, ref_chosen_logps=rc, ref_rejected_logps=rr)
    new = dict(chosen_logprobs=lc, rejected_logprobs=lr, ref_chosen_logprobs=rc, ref_rejected_logprobs=rr)
    _warns_same(lambda: fa.preference_loss(**old, beta=0.2), lambda: fa.preference_loss(**new, beta=0.2),
                "use chosen_logprobs")
    mod = fa.PreferenceLoss("ipo", beta=0.2)
    lengths = dict(chosen_lengths=torch.full((B,), 4.0), rejected_lengths=torch.full((B,), 3.0))
    _warns_same(lambda: mod(**old, **lengths), lambda: mod(**new, **lengths), r"PreferenceLoss\.forward\(")
    with pytest.raises(TypeError, match="chosen_logprobs only"):
        fa.preference_loss(lc, lr, chosen_logps=lc)


def test_unpaired_preference_loss_logps_are_logprobs():
    lp, ref = torch.randn(2, 6, generator=_g(4)) - 5.0
    desirable = torch.tensor([True, False, True, True, False, False])
    _warns_same(lambda: unpaired_preference_loss(logps=lp, ref_logps=ref, desirable=desirable),
                lambda: unpaired_preference_loss(logprobs=lp, ref_logprobs=ref, desirable=desirable), "logprobs")
    kl = torch.tensor([0.3, -0.1])
    _warns_same(lambda: unpaired_preference_loss(lp, ref, desirable, kl=kl),
                lambda: unpaired_preference_loss(lp, ref, desirable, kto_kl=kl), "use kto_kl=")


def test_linear_preference_reference_logps_are_logprobs():
    h, w = torch.randn(2 * B, T, H, generator=_g(5)), torch.randn(V, H, generator=_g(6))
    y = torch.randint(0, V, (2 * B, T), generator=_g(7))
    rs = torch.randn(2 * B, generator=_g(8)) - 5.0
    mod = fa.LinearPreferenceLoss(beta=0.2)
    _warns_same(lambda: mod(h, w, y, ref_chosen_logps=rs[:B], ref_rejected_logps=rs[B:]),
                lambda: mod(h, w, y, ref_chosen_logprobs=rs[:B], ref_rejected_logprobs=rs[B:]),
                "ref_chosen_logprobs")


def test_kl_penalty_kind_through_the_shared_helper():
    lp, ref = torch.randn(2, B, T, generator=_g(9))
    _warns_same(lambda: fa.kl_penalty(lp, ref, kind="k2"), lambda: fa.kl_penalty(lp, ref, kl_type="k2"),
                "use kl_type")
    _warns_same(lambda: fa.kl_penalty(lp * 40, ref, clamp=False), lambda: fa.kl_penalty(lp * 40, ref, kl_clamp=False),
                "use kl_clamp")


def test_token_advantages_takes_advantages():
    """token_advantages(adv=) abbreviated the name every other function spells out."""
    a, m = torch.randn(B, generator=_g(5)), _mask()
    _warns_same(lambda: fa.token_advantages(adv=a, response_mask=m),
                lambda: fa.token_advantages(advantages=a, response_mask=m), "use advantages")


def test_linear_divergence_loss_normalizer_is_global_tokens():
    """linear_divergence_loss(normalizer=) named the token count the loss divides by, global_tokens in
    policy_loss and aggregate_loss: the former name still works, with a warning, for the same loss, metrics and
    gradients."""
    h, w = torch.randn(B, T, H, generator=_g(10)).requires_grad_(), torch.randn(V, H, generator=_g(11))
    ht, wt = torch.randn(B, T, H, generator=_g(12)), torch.randn(V, H, generator=_g(13))
    w.requires_grad_()

    def run(**kw):
        loss, metrics = fa.linear_divergence_loss(h, w, ht, wt, beta=0.3, response_mask=_mask(), **kw)
        return (loss, metrics, *torch.autograd.grad(loss, (h, w)))

    for count in (7.0, torch.tensor(11.0)):
        _warns_same(lambda: run(normalizer=count), lambda: run(global_tokens=count),
                    r"linear_divergence_loss\(normalizer=\.\.\.\) is deprecated: use global_tokens")
    with pytest.raises(TypeError, match="pass global_tokens only"):
        fa.linear_divergence_loss(h, w, ht, wt, global_tokens=7.0, normalizer=7.0)


def test_gae_and_optimal_baseline_return_named_pairs():
    """gae_advantages and optimal_token_baseline_advantages return AdvantagesAndReturns (fields by name; it
    unpacks as the pair it was)."""
    r, v = torch.randn(2, B, T, generator=_g(6))
    m = _mask()
    out = fa.gae_advantages(r, v, m)
    a, ret = out
    assert isinstance(out, fa.AdvantagesAndReturns) and out.advantages is a and out.returns is ret
    old, p2 = -torch.rand(B, T, generator=_g(7)), torch.rand(B, T, generator=_g(8)) * 0.3
    out = fa.optimal_token_baseline_advantages(r, m, list(range(B)), old, p2)
    assert isinstance(out, fa.AdvantagesAndReturns) and out.advantages.shape == out.returns.shape == (B, T)


def test_preference_weights_are_pair_weights():
    """preference_loss(weights=) sat beside the head's weight and the loss_weights: per-pair weights are
    pair_weights, the former name still accepted with a warning."""
    lc, lr, lc0, lr0 = torch.randn(4, B, generator=_g(3))
    w = torch.rand(B, generator=_g(4))
    _warns_same(lambda: fa.preference_loss(lc, lr, lc0, lr0, weights=w),
                lambda: fa.preference_loss(lc, lr, lc0, lr0, pair_weights=w),
                r"preference_loss\(weights=\.\.\.\) is deprecated: use pair_weights")
    _warns_same(lambda: fa.PreferenceLoss(beta=0.2)(lc, lr, lc0, lr0, weights=w),
                lambda: fa.PreferenceLoss(beta=0.2)(lc, lr, lc0, lr0, pair_weights=w), "use pair_weights")


def test_renamed_arguments_are_listed_in_the_docs():
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    assert "## Renamed arguments" in page
    for owner, old, new in _deprecate.RENAMED:
        assert f"| `{owner}` | `{old}` | `{new}` |" in page


# ---------------------------------------------------------------- configuration at construction

@pytest.mark.parametrize("make,match", [
    (lambda: fa.PolicyLoss(eps_hihg=0.3), "PolicyLoss got an unknown option 'eps_hihg'; did you mean 'eps_high'"),
    (lambda: fa.LinearPolicyLoss(temprature=0.7), "unknown option 'temprature'; did you mean 'temperature'"),
    (lambda: fa.PreferenceLoss(bta=0.1), "unknown option 'bta'; did you mean 'beta'"),
    (lambda: fa.LinearPreferenceLoss(temprature=0.7), "unknown option 'temprature'; did you mean 'temperature'"),
    (lambda: fa.LinearPreferenceLoss(single_pas=True), "did you mean 'single_pass'"),
], ids=["PolicyLoss", "LinearPolicyLoss", "PreferenceLoss", "LinearPreferenceLoss", "LinearPreferenceLoss-own"])
def test_misspelled_option_is_a_type_error_with_the_closest_name(make, match):
    with pytest.raises(TypeError, match=match):
        make()


@pytest.mark.parametrize("make,match", [
    (lambda: fa.PolicyLoss(loss_type="grop"), "loss_type must be one of .*got 'grop'; did you mean 'grpo'"),
    (lambda: fa.PolicyLoss(entropy_coef=0.1, entropy_agg="token_mean"), "entropy_agg.*did you mean 'token-mean'"),
    (lambda: fa.PolicyLoss(loss_type="ppo", rollout_correction="token_trunc"),
     "rollout_correction.*did you mean 'token_truncate'"),
    (lambda: fa.LinearPolicyLoss(temperature=0.0), "temperature"),
    (lambda: fa.LinearPolicyLoss(softcap=-1.0), "softcap"),
    (lambda: fa.LinearPolicyLoss(logit_scale=math.inf), "logit_scale"),
    (lambda: fa.LinearPolicyLoss(backend="tritn"), "backend.*did you mean 'triton'"),
    (lambda: fa.LinearPolicyLoss(chunk=(0, 4)), "chunk"),
    (lambda: fa.PreferenceLoss(cpo_alpha=math.nan), "cpo_alpha"),
    (lambda: fa.PreferenceLoss(f_divergence="forward"), "f_divergence.*did you mean 'forward_kl'"),
    (lambda: fa.LinearPreferenceLoss(temperature=-1.0), "temperature"),
    (lambda: fa.LinearPreferenceLoss(softcap=0.0), "softcap"),
    (lambda: fa.LinearPreferenceLoss(ld_alpha=math.nan), "ld_alpha"),
    (lambda: fa.LinearPreferenceLoss(use_weighting=True, wpo_cap=-1.0), "wpo_cap"),
    (lambda: fa.LinearPreferenceLoss(backend="cuda2"), "backend"),
    (lambda: fa.LinearPreferenceLoss(compact=1), "compact"),
])
def test_bad_value_is_a_value_error_naming_the_option_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_linear_policy_loss_index_option_type():
    with pytest.raises(TypeError, match="ignore_index"):
        fa.LinearPolicyLoss(ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index"):
        fa.LinearPreferenceLoss(ignore_index="x")


def test_a_module_forward_warns_at_the_callers_line():
    """A former name passed to a module's forward warned from inside torch's module.py, where Python's default
    filters hide a DeprecationWarning; the warning is attributed to the caller's line now."""
    lc, lr = -torch.rand(3), -torch.rand(3)
    with pytest.warns(_deprecate.RenamedWarning) as record:
        fa.PreferenceLoss()(chosen_logps=lc, rejected_logps=lr, ref_chosen_logprobs=lc - 0.1,
                            ref_rejected_logprobs=lr - 0.1)
    assert record[0].filename == __file__


def test_former_names_trace_under_torch_compile():
    """A former name inside a compiled step traces (the warning's frame walk does not: the eager call warns, the
    traced one does not), and gives the eager value."""
    g = _g(11)
    lp, old, adv = torch.randn(3, B, T, generator=g)
    m = _mask()
    with pytest.warns(_deprecate.RenamedWarning):
        want = fa.policy_loss(lp, old, adv, m, loss_type="sapo", sapo_tau=(0.5, 2.0))[0]
    step = torch.compile(lambda x: fa.policy_loss(x, old, adv, m, loss_type="sapo", sapo_tau=(0.5, 2.0))[0]
                         + fa.kl_penalty(x, old, clamp=False).sum(), fullgraph=True, backend="eager")
    got = step(lp)
    assert torch.allclose(got, want + fa.kl_penalty(lp, old, kl_clamp=False).sum(), rtol=1e-6, atol=1e-6)


def test_dataclasses_replace_takes_a_former_pair_option():
    """dataclasses.replace passes every field back (the new options unset, None): a former name beside them is not
    a conflict."""
    import dataclasses

    cfg = fa.PolicyConfig(loss_type="sapo")
    with pytest.warns(_deprecate.RenamedWarning):
        new = dataclasses.replace(cfg, sapo_tau=(1.0, 3.0))
    assert (new.sapo_tau_pos, new.sapo_tau_neg) == (1.0, 3.0)
    with pytest.raises(TypeError, match="pass sapo_tau_pos / sapo_tau_neg only"):
        fa.PolicyConfig(loss_type="sapo", sapo_tau=(1.0, 3.0), sapo_tau_neg=2.0)
