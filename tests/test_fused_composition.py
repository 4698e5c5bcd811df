"""The fused-head losses against the same loss composed from their parts, where the single pass through the
head splits the batch into many blocks (``FASTALIGN_BLOCK_MIB`` tiny: one item per block):

* ``LinearPolicyLoss`` with a ``PolicyConfig`` (per call or at construction) takes the path of that
  configuration's loss: a sequence-level or batch-coupled loss never goes through blocks of any tokens;
* ``LinearPreferenceLoss`` (orpo) with a pair of empty responses: a NaN loss comes with NaN gradients on the
  single pass as on the two passes (the NaN is in a block with no token), and the unscored rows keep 0;
* ``LinearPolicyLoss``'s single pass keeps its two passes' gradient of a NaN loss (a NaN ratio under a clamp
  passes none): the rule of each loss is that of its two passes.
"""
from __future__ import annotations

import pytest
import torch

import fastalign
from conftest import CPU_BACKENDS
from helpers import assert_close

B, T, H, V = 3, 5, 8, 40

PER_CALL = {
    "gspo+entropy": dict(loss_type="gspo", eps_low=3e-4, eps_high=4e-4, entropy_coef=0.01),
    "sequence_ppo": dict(loss_type="ppo", importance_sampling_level="sequence", eps_low=3e-4, eps_high=4e-4),
    "kl_cov": dict(loss_type="kl_cov", cov_ratio=0.2),
    "clip_cov": dict(loss_type="clip_cov", cov_ratio=0.5, cov_lb=-5.0, cov_ub=5.0),
}


@pytest.fixture
def many_blocks(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BLOCK_MIB", "1e-9")


def _policy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 0] = -100  # a prompt token
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3:] = False
    return hidden, weight, labels, lp + 0.3 * torch.randn(B, T, generator=g), torch.randn(B, generator=g), mask


def _policy_run(module, batch, **call):
    hidden, weight, labels, old, adv, mask = batch
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = module(h, w, labels, old, adv, mask, **call)
    return (loss, *torch.autograd.grad(loss, (h, w))), metrics


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(PER_CALL))
def test_a_policy_config_takes_the_path_of_its_loss(name, backend, many_blocks):
    """LinearPolicyLoss()(..., config=PolicyConfig(...)) computed that config's loss but chose the path from the
    module's own keywords (ppo: blocks of any tokens), so gspo, a sequence ratio, kl_cov and clip_cov got wrong
    gradients over several blocks (and an entropy bonus in the config raised). The per-call config, the config
    at construction (it raised TypeError) and the same fields as keywords now give the same loss, metrics and
    gradients."""
    batch = _policy_batch()
    options = PER_CALL[name]
    config = fastalign.PolicyConfig(**options)

    def call():  # clip_cov draws its tokens: the same seed on every run
        return dict(generator=torch.Generator().manual_seed(3)) if options["loss_type"] == "clip_cov" else {}

    want, want_metrics = _policy_run(fastalign.LinearPolicyLoss(backend=backend, **options), batch, **call())
    two_passes, _ = _policy_run(fastalign.LinearPolicyLoss(backend=backend, single_pass=False, **options), batch,
                                **call())
    for got, ref in zip(want, two_passes):
        assert_close(got, ref, atol=2e-5, rtol=2e-5, what=f"{name}: keywords against the two passes")
    for how, module, extra in (("per call", fastalign.LinearPolicyLoss(backend=backend), dict(config=config)),
                               ("at construction", fastalign.LinearPolicyLoss(backend=backend, config=config), {})):
        got, metrics = _policy_run(module, batch, **extra, **call())
        for g, w, what in zip(got, want, ("loss", "d hidden", "d weight")):
            assert_close(g, w, atol=1e-6, rtol=1e-6, what=f"{name} {how}: {what}")
        assert set(metrics) == set(want_metrics)
    if options["loss_type"] in ("kl_cov", "clip_cov"):
        with pytest.raises(ValueError, match="single_pass=True does not apply"):
            _policy_run(fastalign.LinearPolicyLoss(backend=backend, single_pass=True), batch, config=config)
        with pytest.raises(ValueError, match="single_pass=True does not apply"):
            fastalign.LinearPolicyLoss(config=config, single_pass=True)


def test_a_policy_config_at_construction_takes_keywords_over_it():
    """LinearPolicyLoss(config=..., field=...) is PolicyLoss(config=..., field=...): the keywords replace the
    config's fields; a config that is not a PolicyConfig is a TypeError naming it."""
    batch = _policy_batch(1)
    got, _ = _policy_run(fastalign.LinearPolicyLoss(config=fastalign.PolicyConfig(loss_type="gspo"),
                                                    loss_type="ppo", eps_high=0.28), batch)
    want, _ = _policy_run(fastalign.LinearPolicyLoss(loss_type="ppo", eps_high=0.28), batch)
    for g, w in zip(got, want):
        assert_close(g, w, atol=0.0, what="config with keywords")
    with pytest.raises(TypeError, match="config must be a fastalign.PolicyConfig"):
        fastalign.LinearPolicyLoss(config=dict(loss_type="gspo"))
    with pytest.raises(TypeError, match="config must be a fastalign.PolicyConfig"):
        _policy_run(fastalign.LinearPolicyLoss(), batch, config=dict(loss_type="gspo"))


def _empty_pair_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, 0] = -100  # a prompt token
    labels[1], labels[B + 1] = -100, -100  # pair 1: an empty chosen and an empty rejected response
    return hidden, weight, labels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_orpo_nan_loss_comes_with_nan_gradients_over_many_blocks(backend, many_blocks):
    """ORPO's odds of a pair of empty responses are NaN; its NLL carries the NaN to every chosen token, so the
    two passes give NaN gradients. Over several blocks the NaN stayed in the empty pair's block (no token to
    carry it) and the single pass gave finite gradients for a NaN loss. Now the head's and every scored row's
    gradients are NaN, and an unscored row's d(hidden) stays exactly 0 (as on the two passes)."""
    hidden, weight, labels = _empty_pair_batch()
    scored = labels != -100
    results = {}
    for single_pass in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = fastalign.LinearPreferenceLoss("orpo", beta=0.1, backend=backend, single_pass=single_pass)(
            h, w, labels)
        results[single_pass] = (loss, *torch.autograd.grad(loss, (h, w)))
    for single_pass, (loss, dh, dw) in results.items():
        assert torch.isnan(loss), single_pass
        assert torch.isnan(dw).any() and torch.isnan(dh[scored]).any(), single_pass
        assert torch.equal(dh[~scored], torch.zeros_like(dh[~scored])), single_pass
    loss, dh, dw = results[True]
    assert torch.isnan(dw).all() and torch.isnan(dh[scored]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_orpo_without_an_empty_pair_keeps_its_gradients_over_many_blocks(backend, many_blocks):
    """The NaN rule changes nothing on a finite loss: the single pass equals the two passes."""
    hidden, weight, labels = _empty_pair_batch(1)
    labels[1, 1:], labels[B + 1, 2:] = 3, 4  # no empty pair
    results = []
    for single_pass in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = fastalign.LinearPreferenceLoss("orpo", beta=0.1, backend=backend, single_pass=single_pass)(
            h, w, labels)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    assert all(torch.isfinite(t).all() for t in results[0])
    for got, want, what in zip(*results, ("loss", "d hidden", "d weight")):
        assert_close(got, want, atol=2e-5, rtol=2e-5, what=what)


@pytest.mark.parametrize("loss_type", ["ppo", "grpo"])
def test_policy_single_pass_keeps_the_two_pass_gradient_of_a_nan_loss(loss_type, many_blocks):
    """A NaN old log-prob on a scored token makes the policy loss NaN while its clamp passes no gradient there
    (docs/bad-inputs.md): the two passes' gradients are finite, and so are the single pass's, equal to them."""
    hidden, weight, labels, old, adv, mask = _policy_batch(2)
    old[0, 2] = float("nan")
    results = []
    for single_pass in (True, False):
        got, _ = _policy_run(fastalign.LinearPolicyLoss(loss_type=loss_type, single_pass=single_pass),
                             (hidden, weight, labels, old, adv, mask))
        results.append(got)
    assert torch.isnan(results[0][0]) and torch.isnan(results[1][0])
    for got, want, what in zip(results[0][1:], results[1][1:], ("d hidden", "d weight")):
        assert torch.isfinite(want).all(), what
        assert_close(got, want, atol=2e-5, rtol=2e-5, what=what)
