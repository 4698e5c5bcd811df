"""verl 0.9.1 parity: every ``algorithm.adv_estimator`` fastalign covers, through
:func:`fastalign.integrations.verl.compute_advantage`, against verl's own ``core_algos`` functions.

verl's ``ray_trainer.compute_advantage`` (not importable without verl's training stack) picks the
estimator and its keyword arguments; :func:`_verl` calls the registered ``core_algos`` function with
the keywords that dispatcher passes (``norm_adv_by_std_in_grpo`` to grpo only, ``config`` to the
others, ``index`` = the ``uid`` array, ``reward_baselines`` for remax). Float64 inputs, 1e-6, on
batches with ragged masks, string and integer uids, groups of one, ties and empty responses.
"""
import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl is not installed: `pip install --no-deps verl==0.9.1` (see the Makefile)")

from verl.trainer.config import AlgoConfig  # noqa: E402

import fastalign as fa  # noqa: E402
from fastalign.integrations import verl as fverl  # noqa: E402
from fastalign.reference import advantages as R  # noqa: E402

D = torch.float64
TOL = dict(atol=1e-6, rtol=1e-6)


def _verl(cfg: AlgoConfig, r, mask, uid=None, values=None, baselines=None):
    """verl's estimator called with the keywords of ray_trainer.compute_advantage."""
    est = cfg.adv_estimator
    if est == "gae":
        return core_algos.compute_gae_advantage_return(token_level_rewards=r.clone(), values=values,
                                                       response_mask=mask, gamma=cfg.gamma, lam=cfg.lam)
    if est == "grpo":
        return core_algos.compute_grpo_outcome_advantage(token_level_rewards=r.clone(), response_mask=mask,
                                                         index=uid, norm_adv_by_std_in_grpo=cfg.norm_adv_by_std_in_grpo)
    kw = dict(token_level_rewards=r.clone(), response_mask=mask, config=cfg)
    if uid is not None:
        kw["index"] = uid
    if baselines is not None:
        kw["reward_baselines"] = baselines
    return core_algos.get_adv_estimator_fn(est)(**kw)


def _batch(seed=0, B=12, T=7, holes=False, ties=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    if holes:  # masked spans inside a response (multi-turn observation tokens)
        mask[0, 2:4] = 0
        mask[1, 0] = 0 if lengths[1] > 1 else 1
    scores = torch.randn(B, generator=g, dtype=D) * 2
    if ties:
        scores = torch.randint(0, 3, (B,), generator=g).to(D)
    r = torch.zeros(B, T, dtype=D)
    last = (mask * torch.arange(T)).argmax(1)
    r[torch.arange(B), last] = scores  # outcome reward on the last valid token
    token_r = torch.randn(B, T, generator=g, dtype=D) * mask
    values = torch.randn(B, T, generator=g, dtype=D)
    baselines = torch.randn(B, generator=g, dtype=D)
    return r, token_r, mask, values, baselines


UIDS = {
    "str-with-singletons": np.array(["p0", "p1", "p0", "p2", "p1", "p0", "p3", "p2", "p1", "p0", "p4", "p4"],
                                    dtype=object),
    "int-ndarray": np.array([7, 7, 7, 7, 3, 3, 3, 3, 9, 9, 9, 9]),
    "str-interleaved": np.array(["b", "a"] * 6),
}
GROUPED = ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg", "grpo_passk",
           "reinforce_plus_plus_baseline", "gdpo"]


def _close(a, b, what):
    torch.testing.assert_close(a.to(D), b.to(D), **TOL, msg=lambda m: f"{what}: {m}")


def test_every_verl_estimator_is_mapped():
    verl = {e.value for e in core_algos.AdvantageEstimator}
    assert verl == set(fverl.ESTIMATORS), verl ^ set(fverl.ESTIMATORS)
    with pytest.raises(ValueError, match="not covered"):
        fverl.compute_advantage(dict(adv_estimator="no_such_estimator"), torch.zeros(2, 3), torch.ones(2, 3))


OTB = ["optimal_token_baseline", "tir_optimal_token_baseline"]


def _otb_inputs(seed, B=12, T=7, holes=True, dtype=D):
    _, token_r, mask, _, _ = _batch(seed=seed, B=B, T=T, holes=holes)
    g = torch.Generator().manual_seed(seed + 100)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3.0
    p2 = torch.exp(old) ** 2 + torch.rand(B, T, generator=g, dtype=D) * 0.3
    iw = torch.rand(B, T, generator=g, dtype=D) + 0.5
    mask[5] = 0  # an empty response
    return [t.to(dtype) for t in (token_r * mask, mask, old, p2, iw)]


@pytest.mark.parametrize("with_iw", [False, True], ids=["plain", "is_weights"])
@pytest.mark.parametrize("uid", list(UIDS), ids=list(UIDS))
@pytest.mark.parametrize("estimator", OTB)
def test_optimal_token_baseline_matches_verl(estimator, uid, with_iw):
    r, mask, old, p2, iw = _otb_inputs(seed=OTB.index(estimator) + 20)
    iw = iw if with_iw else None
    index = UIDS[uid]
    cfg = AlgoConfig(adv_estimator=estimator)
    adv_v, ret_v = core_algos.get_adv_estimator_fn(estimator)(
        token_level_rewards=r.clone(), response_mask=mask, config=cfg, index=index, old_log_probs=old,
        sum_pi_squared=p2, rollout_is_weights=iw)
    adv_f, ret_f = fverl.compute_advantage(cfg, r, mask, index, old_log_probs=old, sum_pi_squared=p2,
                                           rollout_is_weights=iw)
    _close(adv_f, adv_v, f"{estimator} advantages")
    _close(ret_f, ret_v, f"{estimator} returns")
    assert (adv_f[mask == 0] == 0).all()
    align = "response" if estimator.startswith("tir") else "position"
    adv_r, ret_r = R.optimal_token_baseline_advantages(r, mask, list(index), old, p2, iw, align=align)
    _close(adv_f, adv_r, "advantages vs reference")
    _close(ret_f, ret_r, "returns vs reference")


@pytest.mark.parametrize("estimator", OTB)
def test_optimal_token_baseline_zero_tail_binds(estimator):
    """A strictly longest response in a group: verl's zero tail changes the advantages, and both agree."""
    r, mask, old, p2, _ = _otb_inputs(seed=30, holes=False)
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    mask[0] = 1  # the only response of full length in group 0
    mask[1:4, 4:] = 0
    align = "response" if estimator.startswith("tir") else "position"
    with_tail = fa.advantages.optimal_token_baseline_advantages(r, mask, index, old, p2, align=align)[0]
    no_tail = fa.advantages.optimal_token_baseline_advantages(r, mask, index, old, p2, align=align,
                                                              zero_tail=False)[0]
    assert not torch.allclose(with_tail[0], no_tail[0])
    adv_v, _ = core_algos.get_adv_estimator_fn(estimator)(
        token_level_rewards=r.clone(), response_mask=mask, config=AlgoConfig(adv_estimator=estimator),
        index=index.numpy(), old_log_probs=old, sum_pi_squared=p2)
    _close(with_tail, adv_v, "zero tail")


@pytest.mark.parametrize("estimator", OTB)
def test_optimal_token_baseline_epsilon_is_verls(estimator):
    """A large ``epsilon`` in the baseline's denominator ``sum W m + eps``: verl's estimator given the same
    ``epsilon`` (``eps`` of fastalign) agrees."""
    r, mask, old, p2, iw = _otb_inputs(seed=33)
    index = UIDS["str-with-singletons"]
    adv_v, ret_v = core_algos.get_adv_estimator_fn(estimator)(
        token_level_rewards=r.clone(), response_mask=mask, index=index, old_log_probs=old, sum_pi_squared=p2,
        rollout_is_weights=iw, epsilon=0.7)
    align = "response" if estimator.startswith("tir") else "position"
    adv_f, ret_f = fa.advantages.optimal_token_baseline_advantages(r, mask, index, old, p2, importance_weights=iw,
                                                                   align=align, eps=0.7)
    _close(adv_f, adv_v, f"{estimator} advantages")
    _close(ret_f, ret_v, f"{estimator} returns")


def test_multi_turn_optimal_token_baseline_group_of_one_non_empty_response():
    """verl's multi-turn baseline leaves empty responses out of their group: a response whose only partner is
    empty is a group of one (baseline 0, its advantage its return). Without the zero tail, which would hide it."""
    r, mask, old, p2, _ = _otb_inputs(seed=32)
    assert mask[5].sum() == 0 and mask[4].sum() > 0
    index = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])  # row 4's only partner is the empty row 5
    adv_v, ret_v = core_algos.compute_multi_turn_optimal_token_baseline_advantage(
        token_level_rewards=r.clone(), response_mask=mask, index=index, old_log_probs=old, sum_pi_squared=p2,
        handle_zero_tail=False)
    adv_f, ret_f = fa.advantages.optimal_token_baseline_advantages(r, mask, index, old, p2, align="response",
                                                                   zero_tail=False)
    _close(adv_f, adv_v, "advantages")
    _close(ret_f, ret_v, "returns")
    _close(adv_f[4], ret_v[4] * mask[4], "a group of one non-empty response")


def test_optimal_token_baseline_float32_and_bad_inputs():
    r, mask, old, p2, iw = _otb_inputs(seed=31, dtype=torch.float32)
    index = UIDS["str-interleaved"]
    cfg = AlgoConfig(adv_estimator="optimal_token_baseline")
    adv_v, _ = core_algos.get_adv_estimator_fn("optimal_token_baseline")(
        token_level_rewards=r.clone(), response_mask=mask, config=cfg, index=index, old_log_probs=old,
        sum_pi_squared=p2, rollout_is_weights=iw)
    adv_f, _ = fverl.compute_advantage(cfg, r, mask, index, old_log_probs=old, sum_pi_squared=p2,
                                       rollout_is_weights=iw)
    assert adv_f.dtype == torch.float32
    torch.testing.assert_close(adv_f, adv_v, atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="sum_pi_squared"):
        fverl.compute_advantage(cfg, r, mask, index, old_log_probs=old)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        fverl.compute_advantage(AlgoConfig(adv_estimator="grpo"), r, mask, index, rollout_is_weights=iw)
    with pytest.raises(ValueError, match="align"):
        fa.advantages.optimal_token_baseline_advantages(r, mask, index, old, p2, align="turn")
    with pytest.raises(ValueError, match="sum_p2"):
        fa.advantages.optimal_token_baseline_advantages(r, mask, index, old, p2[:, :3])


def test_algo_defaults_are_verls():
    cfg = AlgoConfig()
    for k, v in fverl.ALGO_DEFAULTS.items():
        assert getattr(cfg, k) == v, k


@pytest.mark.parametrize("uid", list(UIDS), ids=list(UIDS))
@pytest.mark.parametrize("estimator,norm", [(e, True) for e in GROUPED] + [("grpo", False), ("grpo_passk", False)])
def test_grouped_estimators(estimator, uid, norm):
    # norm_adv_by_std_in_grpo=False reaches grpo and grpo_passk only (the others refuse it, tested below)
    index = UIDS[uid]
    if estimator == "grpo_passk" and uid == "str-with-singletons":
        index = UIDS["str-interleaved"]  # verl's pass@k needs groups of at least 2
    cfg = AlgoConfig(adv_estimator=estimator, norm_adv_by_std_in_grpo=norm)
    for ties in (False, True):
        r, _, mask, _, _ = _batch(seed=3, ties=ties)
        adv_v, ret_v = _verl(cfg, r, mask, index)
        adv_f, ret_f = fverl.compute_advantage(cfg, r, mask, index)
        tol = dict(atol=2e-6, rtol=2e-6) if estimator == "grpo_vectorized" else TOL  # verl: float32 statistics
        torch.testing.assert_close(adv_f, adv_v.to(D), **tol)
        torch.testing.assert_close(ret_f, ret_v.to(D), **tol)


def test_grouped_estimators_with_an_integer_tensor_uid():
    r, _, mask, _, _ = _batch(seed=4)
    uid = torch.tensor(UIDS["int-ndarray"])
    for est in ("grpo", "rloo", "opo", "gpg"):
        cfg = AlgoConfig(adv_estimator=est)
        _close(fverl.compute_advantage(cfg, r, mask, uid)[0], _verl(cfg, r, mask, UIDS["int-ndarray"])[0], est)


@pytest.mark.parametrize("weights", [None, [0.7, 0.3]])
def test_gdpo_reward_columns(weights):
    """verl's gdpo with gdpo_reward_keys: each key's score sits on the last valid response token."""
    r, _, mask, _, _ = _batch(seed=5)
    B, T = mask.shape
    g = torch.Generator().manual_seed(1)
    cols = torch.randn(B, 2, generator=g, dtype=D)
    index = UIDS["str-with-singletons"]
    prompt = 3
    attention = torch.cat([torch.ones(B, prompt), mask], 1).long()  # verl: last valid token = length - 1
    cfg = AlgoConfig(adv_estimator="gdpo", gdpo_reward_keys=["fmt", "acc"], gdpo_reward_weights=weights)
    non_tensor = {"fmt": cols[:, 0].float().numpy(), "acc": cols[:, 1].float().numpy()}
    adv_v, _ = core_algos.compute_gdpo_outcome_advantage(
        token_level_rewards=r, response_mask=mask, index=index, config=cfg, non_tensor_batch=non_tensor,
        batch={"prompts": torch.zeros(B, prompt), "attention_mask": attention})
    adv_f, _ = fverl.compute_advantage(cfg, r, mask, index, reward_scores=cols.float().to(D))
    _close(adv_f, adv_v, "gdpo")


def test_std_flag_that_verl_drops_is_refused():
    for est in ("grpo_vectorized", "gdpo"):
        with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo"):
            fverl.compute_advantage(AlgoConfig(adv_estimator=est, norm_adv_by_std_in_grpo=False),
                                    torch.zeros(2, 3), torch.ones(2, 3), ["a", "a"])


@pytest.mark.parametrize("holes", [False, True], ids=["plain", "masked-spans"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95)])
def test_token_level_estimators(holes, gamma, lam):
    _, token_r, mask, values, baselines = _batch(seed=6, holes=holes)
    valid = mask.bool()
    for est in ("gae", "reinforce_plus_plus", "remax"):
        cfg = AlgoConfig(adv_estimator=est, gamma=gamma, lam=lam)
        adv_v, ret_v = _verl(cfg, token_r, mask, values=values, baselines=baselines)
        adv_f, ret_f = fverl.compute_advantage(cfg, token_r, mask, values=values, reward_baselines=baselines)
        # fastalign zeroes masked positions; verl leaves its scan's values there (every loss masks them)
        for got, want, what in ((adv_f, adv_v, "advantages"), (ret_f, ret_v, "returns")):
            _close(got[valid], want[valid], f"{est} {what}")
            assert torch.equal(got[~valid], torch.zeros_like(got[~valid])), est
        if est == "reinforce_plus_plus":  # verl masks these itself: compare everywhere
            _close(adv_f, adv_v, "reinforce_plus_plus advantages (all positions)")
            _close(ret_f, ret_v, "reinforce_plus_plus returns (all positions)")


def test_from_a_dict_config():
    r, _, mask, _, _ = _batch(seed=7)
    index = list(UIDS["str-interleaved"])
    a, _ = fverl.compute_advantage({"adv_estimator": "grpo", "norm_adv_by_std_in_grpo": False}, r, mask, index)
    b, _ = fverl.compute_advantage(AlgoConfig(adv_estimator="grpo", norm_adv_by_std_in_grpo=False), r, mask, index)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="gdpo_reward_weights"):
        fverl.compute_advantage({"adv_estimator": "grpo", "gdpo_reward_weights": [1.0]}, r, mask, index)


def test_pf_ppo_resampling_after_gae_is_refused():
    """verl's ``compute_advantage`` resamples the batch after gae when ``use_pf_ppo`` is set (its other estimators
    ignore the flag); fastalign's returns the advantages of the batch as given: the flag raises with gae only."""
    _, token_r, mask, values, _ = _batch(seed=8)
    for config in (AlgoConfig(adv_estimator="gae", use_pf_ppo=True), {"adv_estimator": "gae", "use_pf_ppo": True}):
        with pytest.raises(ValueError, match="use_pf_ppo.*compute_pf_ppo_reweight_data"):
            fverl.compute_advantage(config, token_r, mask, values=values)
    cfg = AlgoConfig(adv_estimator="reinforce_plus_plus", use_pf_ppo=True)
    _close(fverl.compute_advantage(cfg, token_r, mask)[0], _verl(cfg, token_r, mask)[0], "reinforce_plus_plus")


# ------------------------------------------------------------------ the options behind the profile, vs the reference

@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_singleton_unit_std_matches_reference(dtype):
    g = torch.Generator().manual_seed(8)
    scores = (torch.randn(9, generator=g, dtype=D) * 3).to(dtype)
    scores[4] = float("nan")
    index = torch.tensor([0, 1, 0, 2, 3, 3, 4, 1, 0])  # groups 2 and 4 alone, group 3 alone once NaN drops
    for est, std in (("grpo", "group"), ("grpo", "none"), ("grpo", "batch"), ("gpg", "group"), ("rloo", "group")):
        got = fa.group_advantages(scores, index, estimator=est, singleton="unit_std", std=std)
        want = R.group_advantages(scores, index.tolist(), estimator=est, singleton="unit_std", std=std)
        torch.testing.assert_close(got.to(D), want, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=1e-6)
    alone = fa.group_advantages(scores, index, singleton="unit_std")
    assert alone[3] == (scores[3].to(D) / (1 + 1e-6)).to(dtype)


@pytest.mark.parametrize("singleton", ["raw", "unit_std"])
def test_gdpo_token_batch_normalization_matches_reference(singleton):
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(10, 3, generator=g, dtype=D)
    scores[2, 1] = float("nan")
    scores[5] = float("nan")
    lengths = torch.randint(0, 6, (10,), generator=g).to(D)
    index = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 4])
    kw = dict(estimator="gdpo", reward_weights=[1.0, 0.5, 2.0], singleton=singleton, batch_normalization="token")
    got = fa.group_advantages(scores, index, lengths=lengths, **kw)
    want = R.group_advantages(scores, index.tolist(), lengths=lengths, **kw)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_batch_normalization_bad_values():
    s = torch.randn(4, dtype=D)
    with pytest.raises(ValueError, match="batch_normalization"):
        fa.group_advantages(s, group_size=2, batch_normalization="token")
    with pytest.raises(ValueError, match="batch_normalization"):
        fa.group_advantages(s[:, None], group_size=2, estimator="gdpo", batch_normalization="tokens")
    with pytest.raises(ValueError, match="mask"):
        fa.group_advantages(s[:, None], group_size=2, estimator="gdpo", batch_normalization="token")


@pytest.mark.parametrize("estimator", GROUPED + ["gae", "reinforce_plus_plus", "remax"])
def test_float32_batches_as_verl_gets_them(estimator):
    """verl's batches are float32: same numbers at float32 precision (2e-6), advantages in float32."""
    r, token_r, mask, values, baselines = (t.float() for t in _batch(seed=11))
    index = UIDS["str-interleaved"]
    cfg = AlgoConfig(adv_estimator=estimator, gamma=0.95, lam=0.9)
    rewards = token_r if estimator in ("gae", "reinforce_plus_plus", "remax") else r
    baselines = baselines if estimator == "remax" else None
    adv_v, ret_v = _verl(cfg, rewards, mask, index, values=values, baselines=baselines)
    adv_f, ret_f = fverl.compute_advantage(cfg, rewards, mask, index, values=values, reward_baselines=baselines)
    assert adv_f.dtype == torch.float32
    valid = mask.bool()
    torch.testing.assert_close(adv_f[valid], adv_v[valid], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(ret_f[valid], ret_v[valid], atol=2e-6, rtol=2e-6)


def test_whitening_a_constant_batch_gives_zero():
    """REINFORCE++-baseline on one response: every valid token carries the same value, so the whitened
    advantage is 0. fastalign gives exactly 0; verl's masked mean divides by ``count + 1e-8``, and the
    leftover ``x * 1e-9`` over ``sqrt(0 + 1e-8)`` leaves ~1e-5 (the one place the two differ)."""
    r, _, mask, _, _ = _batch(seed=0, B=1)
    cfg = AlgoConfig(adv_estimator="reinforce_plus_plus_baseline")
    uid = np.array(["p0"], dtype=object)
    adv_v, _ = _verl(cfg, r, mask, uid)
    adv_f, ret_f = fverl.compute_advantage(cfg, r, mask, uid)
    assert torch.equal(adv_f, torch.zeros_like(adv_f)) and torch.equal(ret_f, adv_f)
    assert 0 < adv_v.abs().max() < 1e-4


@pytest.mark.parametrize("estimator", ["gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_whitening_fewer_than_two_tokens_is_nan_where_verl_raises(estimator):
    """verl's batch whitening refuses a batch of one valid token (its unbiased variance divides by N - 1 = 0);
    the profile's advantages are NaN on that token (never a silent 0) and 0 on the other, empty, rows."""
    r, token_r, mask, values, _ = _batch(seed=2)
    mask = torch.zeros_like(mask)
    mask[1, 0] = 1.0
    rewards = token_r * mask if estimator in ("gae", "reinforce_plus_plus") else r
    uid = None if estimator in ("gae", "reinforce_plus_plus") else UIDS["str-with-singletons"]
    extra = dict(values=values) if estimator == "gae" else {}
    cfg = AlgoConfig(adv_estimator=estimator)
    with pytest.raises(ValueError, match="sum of the mask is one"):
        _verl(cfg, rewards, mask, uid, **extra)
    adv, _ = fverl.compute_advantage(cfg, rewards, mask, uid, **extra)
    others = torch.cat((adv[:1], adv[2:]))
    assert torch.isnan(adv[1, 0]) and torch.equal(others, torch.zeros_like(others))


def test_masked_whiten_of_a_fractional_count_divides_by_n_minus_1():
    """A fractional mask of total weight 1 < N < 2 divides by N - 1, as verl's Bessel factor N / (N - 1)."""
    from verl.utils.torch_functional import masked_whiten as verl_whiten

    x = torch.tensor([[0.3, -1.2, 2.0, 0.7]], dtype=D)
    m = torch.tensor([[0.5, 0.25, 0.5, 0.0]], dtype=D)
    torch.testing.assert_close(fa.masked_whiten(x, m), verl_whiten(x, m) * m, **TOL)


def test_masked_whiten_of_a_fractional_count_of_one_is_nan_where_verl_raises():
    """Two half-weight tokens: N = 1, where verl's Bessel factor N / (N - 1) divides by 0 (it raises). The
    unbiased whitening is NaN on those tokens (not a finite 0 from an infinite variance), 0 on the others."""
    from verl.utils.torch_functional import masked_whiten as verl_whiten

    x = torch.tensor([[0.3, -1.2, 2.0, 0.7]], dtype=D)
    m = torch.tensor([[0.5, 0.0, 0.5, 0.0]], dtype=D)
    with pytest.raises(ValueError, match="sum of the mask is one"):
        verl_whiten(x, m)
    out = fa.masked_whiten(x, m)
    assert torch.isnan(out[0, [0, 2]]).all() and torch.equal(out[0, [1, 3]], torch.zeros(2, dtype=D))


@pytest.mark.parametrize("uid", ["str-with-singletons", "int-ndarray-singleton", "tensor-singleton"])
def test_grpo_passk_group_of_one_raises_as_verl(uid):
    """verl's grpo_passk refuses a group of fewer than 2 responses; the profile raises ValueError naming index."""
    r, _, mask, _, _ = _batch(seed=6)
    B = r.shape[0]
    if uid == "str-with-singletons":
        index = UIDS[uid]
    else:
        ids = np.repeat(np.arange(B), 2)[:B]
        ids[-1] = 10 ** 6  # a group of one
        index = ids if uid == "int-ndarray-singleton" else torch.from_numpy(ids)
    cfg = AlgoConfig(adv_estimator="grpo_passk")
    with pytest.raises(ValueError):
        _verl(cfg, r, mask, index.numpy() if torch.is_tensor(index) else index)
    with pytest.raises(ValueError, match="index"):
        fverl.compute_advantage(cfg, r, mask, index)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "opo", "gpg"])
def test_uid_as_a_list_of_tensors_equals_verl(estimator):
    """``list(uid_tensor)`` (0-d tensors, which hash by identity) groups by value, as verl groups the ids."""
    r, _, mask, _, _ = _batch(seed=8)
    ids = torch.from_numpy(UIDS["int-ndarray"])
    cfg = AlgoConfig(adv_estimator=estimator)
    adv_v, _ = _verl(cfg, r, mask, UIDS["int-ndarray"])
    adv_f, _ = fverl.compute_advantage(cfg, r, mask, list(ids))
    _close(adv_f, adv_v, f"{estimator} with a list of tensors")


@pytest.mark.parametrize("uid", ["one-group", "two-groups"])
@pytest.mark.parametrize("inf", [float("inf"), -float("inf")])
def test_gdpo_infinite_reward_is_nan_as_verl(uid, inf):
    """An infinite reward: verl's gdpo (group-normalised column, then ``masked_whiten`` over the batch)
    gives NaN, and so does fastalign, in ``group_advantages`` and the verl profile (not 0)."""
    index = np.array(["a"] * 6 if uid == "one-group" else ["a", "b"] * 3, dtype=object)
    mask = torch.ones(6, 3, dtype=D)
    mask[1, 2] = 0
    r = torch.zeros(6, 3, dtype=D)
    r[:, 1] = torch.tensor([1.0, 0.0, inf, 2.0, 0.5, 1.0], dtype=D)
    cfg = AlgoConfig(adv_estimator="gdpo")
    v, _ = _verl(cfg, r, mask, index)
    f, _ = fverl.compute_advantage(cfg, r, mask, index)
    g = fa.group_advantages(r.sum(-1, keepdim=True), index, estimator="gdpo", batch_normalization="token",
                            response_mask=mask)
    valid = mask > 0
    assert torch.isnan(v[valid]).all()
    assert torch.isnan(f[valid]).all() and torch.isnan(g).all(), (f, g)


# ------------------------------------------------------------------ NaN and infinite scores, as verl computes them

def _bad_scores_batch(bad, dtype=D):
    """Outcome rewards on the last valid token; groups "a" (two bad scores, one of them on an empty
    response, i.e. on a masked slot), "b" (finite), "c" (one bad score), "d" and "e" (groups of one,
    "d" bad). ``bad`` None: every score finite."""
    uid = np.array(["a", "b", "a", "c", "b", "a", "c", "d", "b", "e", "c", "a"], dtype=object)
    B, T = len(uid), 5
    g = torch.Generator().manual_seed(12)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[5] = 0  # an empty response: verl's reward lands on its last (masked) slot
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    scores = torch.randn(B, generator=g, dtype=D).to(dtype)
    scores[1] = 0.0  # a zero score: gpg's count_nonzero
    if bad is not None:
        scores[[0, 5, 3, 7]] = torch.tensor(bad, dtype=dtype)
    r = torch.zeros(B, T, dtype=dtype)
    r[torch.arange(B), (lengths - 1) % T] = scores
    return r, mask, uid


BAD_SCORES = {  # scores of rows 0 and 5 (group a), 3 (group c) and 7 (group d, alone)
    "nan": [float("nan")] * 4,
    "nan_and_inf": [float("nan"), float("inf"), -float("inf"), float("nan")],
    "inf": [float("inf"), -float("inf"), float("inf"), -float("inf")],
    "one_nan": [float("nan"), 0.5, 1.0, 2.0],
}


@pytest.mark.parametrize("dtype", [D, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("bad", list(BAD_SCORES))
@pytest.mark.parametrize("estimator,norm", [(e, True) for e in GROUPED] + [("grpo", False), ("grpo_passk", False)])
def test_non_finite_scores_give_verls_advantages(estimator, norm, bad, dtype):
    """NaN and ±inf sequence scores: verl's NaN groups (grpo, rloo, opo, gpg with its NaN-counting alpha, ...),
    grpo_passk's NaN best response, the all-NaN batch of reinforce_plus_plus_baseline and gdpo, on every
    position of the row, as verl's own function computes them (fastalign's ``group_advantages`` itself
    leaves a NaN score out: docs/math.md)."""
    r, mask, uid = _bad_scores_batch(BAD_SCORES[bad], dtype)
    if estimator == "grpo_passk":
        uid = np.where(np.isin(uid, ["d", "e"]), "b", uid)  # pass@k: groups of two or more
        if bad in ("nan", "nan_and_inf"):  # one NaN per group: topk's order among several NaN is unspecified
            r[5] = r[5].nan_to_num(nan=-3.0)
    cfg = AlgoConfig(adv_estimator=estimator, norm_adv_by_std_in_grpo=norm)
    adv_v, ret_v = _verl(cfg, r, mask, uid)
    for index in (uid, torch.from_numpy(np.unique(uid, return_inverse=True)[1])):
        adv_f, ret_f = fverl.compute_advantage(cfg, r, mask, index)
        assert adv_f.dtype == dtype
        for got, want in ((adv_f, adv_v), (ret_f, ret_v)):
            torch.testing.assert_close(got.to(D), want.to(D), atol=2e-6, rtol=2e-6, equal_nan=True)
    if bad != "inf":
        assert torch.isnan(adv_v).any()
    finite = _bad_scores_batch(None, dtype)[0]  # no bad score: the profile's numbers are group_advantages'
    adv_f, _ = fverl.compute_advantage(cfg, finite, mask, uid)
    torch.testing.assert_close(adv_f.to(D), _verl(cfg, finite, mask, uid)[0].to(D), atol=2e-6, rtol=2e-6)


def test_gpg_alpha_counts_a_nan_score_in_other_groups():
    """verl's gpg: alpha = B / count_nonzero(scores) counts a NaN, so a group without one changes too."""
    r, mask, uid = _bad_scores_batch([float("nan"), 0.5, 1.0, 2.0])
    cfg = AlgoConfig(adv_estimator="gpg")
    adv_v, _ = _verl(cfg, r, mask, uid)
    adv_f, _ = fverl.compute_advantage(cfg, r, mask, uid)
    b = torch.from_numpy(uid == "b")
    core = fa.group_advantages(r.sum(-1), uid, estimator="gpg", singleton="unit_std")
    assert not torch.allclose(core[b], adv_v[b, 0])  # the core leaves the NaN out of the count
    _close(adv_f[b], adv_v[b], "gpg group b")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_on_a_valid_token_of_the_token_level_estimators(bad):
    """A NaN or ±inf reward on a valid token: remax, and the advantages of gae and reinforce_plus_plus
    (whitened over the batch: all NaN), are verl's on the valid tokens; so are their returns for a NaN reward.
    For ±inf, the returns of the other rows are verl's, and the row's are the discounted sum: ±inf at that token
    and every earlier one (verl's are NaN at earlier tokens, docs/parity-policy.md)."""
    _, token_r, mask, values, baselines = _batch(seed=13)
    mask[2] = 1.0
    token_r[2, 3] = bad
    valid = mask.bool()
    for est in ("gae", "reinforce_plus_plus", "remax"):
        cfg = AlgoConfig(adv_estimator=est, gamma=0.9, lam=0.95)
        adv_v, ret_v = _verl(cfg, token_r, mask, values=values, baselines=baselines)
        adv_f, ret_f = fverl.compute_advantage(cfg, token_r, mask, values=values, reward_baselines=baselines)
        torch.testing.assert_close(adv_f[valid], adv_v[valid], **TOL, equal_nan=True)
        if est == "remax" or bad != bad:
            torch.testing.assert_close(ret_f[valid], ret_v[valid], **TOL, equal_nan=True)
        else:
            other = valid.clone()
            other[2] = False
            torch.testing.assert_close(ret_f[other], ret_v[other], **TOL)
            assert (ret_f[2, :4] == bad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("estimator", OTB)
def test_optimal_token_baseline_non_finite_reward_stays_in_its_group(estimator, bad):
    """A non-finite reward on a valid token reaches only its own group, position by position, as verl's per-group
    sums: the other groups' advantages are unchanged and finite."""
    r, mask, old, p2, _ = _otb_inputs(seed=31)
    index = UIDS["str-interleaved"]
    row = 2
    r[row, int(mask[row].nonzero()[1])] = bad
    cfg = AlgoConfig(adv_estimator=estimator)
    adv_v, ret_v = core_algos.get_adv_estimator_fn(estimator)(
        token_level_rewards=r.clone(), response_mask=mask, config=cfg, index=index, old_log_probs=old,
        sum_pi_squared=p2)
    adv_f, ret_f = fverl.compute_advantage(cfg, r, mask, index, old_log_probs=old, sum_pi_squared=p2)
    valid = mask.bool()
    torch.testing.assert_close(adv_f[valid], adv_v[valid], **TOL, equal_nan=True)
    torch.testing.assert_close(ret_f[valid], ret_v[valid], **TOL, equal_nan=True)
    others = torch.tensor([u != index[row] for u in index])
    assert torch.isfinite(adv_f[others]).all()


@pytest.mark.parametrize("estimator", ["gae", "reinforce_plus_plus", "remax"])
def test_epsilon_is_refused_by_the_token_level_estimators(estimator):
    """verl's gae takes no ``epsilon`` (a ``TypeError``) and its reinforce_plus_plus and remax ignore one (their
    ``**kwargs``): no epsilon reaches these estimators in verl, so ``compute_advantage`` refuses it with a
    ``ValueError`` naming it rather than drop it."""
    r, token_r, mask, values, baselines = _batch(seed=8)
    cfg = AlgoConfig(adv_estimator=estimator)
    kw = dict(values=values) if estimator == "gae" else dict(reward_baselines=baselines) if estimator == "remax" else {}
    if estimator == "gae":
        with pytest.raises(TypeError, match="epsilon"):
            core_algos.compute_gae_advantage_return(token_level_rewards=token_r, values=values, response_mask=mask,
                                                    gamma=1.0, lam=1.0, epsilon=1e-3)
    else:
        want = _verl(cfg, token_r, mask, baselines=kw.get("reward_baselines"))
        fn = core_algos.get_adv_estimator_fn(estimator)
        vkw = dict(token_level_rewards=token_r.clone(), response_mask=mask, config=cfg, epsilon=1e-3)
        if estimator == "remax":
            vkw["reward_baselines"] = baselines
        got = fn(**vkw)
        _close(got[0], want[0], f"verl {estimator} with epsilon")
    fverl.compute_advantage(cfg, token_r, mask, **kw)  # without epsilon: computes
    with pytest.raises(ValueError, match="epsilon"):
        fverl.compute_advantage(cfg, token_r, mask, epsilon=1e-3, **kw)


@pytest.mark.parametrize("estimator, kw, error, name", [
    ("grpo", dict(token_level_rewards=None), TypeError, "token_level_rewards"),  # AttributeError
    ("grpo", dict(token_level_rewards=torch.ones(4)), ValueError, "token_level_rewards"),  # IndexError
    ("grpo", dict(token_level_rewards=[[1.0, 0.0]] * 4), TypeError, "token_level_rewards"),
    ("grpo", dict(epsilon="1e-6"), TypeError, "epsilon"),
    ("gae", dict(values=torch.zeros(4, 3), gamma="0.9"), TypeError, "gamma"),  # float() took the string
    ("remax", dict(reward_baselines=torch.zeros(4, 1)), ValueError, "reward_baselines"),  # named baseline
    ("gdpo", dict(reward_scores=torch.zeros(5, 2)), ValueError, "reward_scores"),
    ("optimal_token_baseline", dict(old_log_probs=torch.zeros(4, 3, dtype=torch.long)), TypeError, "old_log_probs"),
    ("optimal_token_baseline", dict(sum_pi_squared=torch.zeros(4, 2)), ValueError, "sum_pi_squared"),
    ("optimal_token_baseline", dict(rollout_is_weights=torch.ones(4)), ValueError, "rollout_is_weights"),
])


def test_compute_advantage_names_verls_argument(estimator, kw, error, name):
    """A bad argument is a TypeError / ValueError naming it as verl does, not as fastalign's estimators do
    (token_rewards, baseline, scores, old_logprobs, sum_p2, importance_weights)."""
    gamma = kw.pop("gamma", 1.0)
    args = dict(token_level_rewards=torch.randn(4, 3), response_mask=torch.ones(4, 3), index=[0, 0, 1, 1])
    if estimator == "optimal_token_baseline":
        args.update(old_log_probs=-torch.rand(4, 3), sum_pi_squared=torch.rand(4, 3))
    args.update(kw)
    rewards, mask, index = (args.pop(k) for k in ("token_level_rewards", "response_mask", "index"))
    with pytest.raises(error, match=f"^{name} "):
        fverl.compute_advantage({"adv_estimator": estimator, "gamma": gamma}, rewards, mask, index, **args)


def _partition(labels):
    """The groups of ``labels`` as a set of frozensets of positions (the labels' values do not matter)."""
    groups = {}
    for i, g in enumerate(np.asarray(labels).tolist()):
        groups.setdefault(g, set()).add(i)
    return {frozenset(s) for s in groups.values()}


AS_TORCH_INDEX_CASES = {
    "numeric-strings": np.array(["1", "01", "1", "001", "2"], dtype=object),
    "numeric-str-array": np.array(["1", "01", "7", "07", "2"]),
    "padded-numeric": [" 1", "1", "1 ", "2", "+2"],
    "alpha": np.array(["b", "a", "b", "c", "a"], dtype=object),
    "numeric-and-alpha": np.array(["1", "a", "01", "a", "b"], dtype=object),
    "int-and-str": np.array([1, "1", 2, "2", "x"], dtype=object),
    "float-integral": np.array([0.0, 1.0, 0.0, 2.0, 1.0]),
    "float-near-integral": np.array([0.0, 1.0 + 1e-8, 1.0, 2.0 - 1e-9, 2.0]),
    "float-fractional": np.array([0.5, 0.7, 1.2, -0.5, -1.7]),
    "float32": np.array([3.0, 3.0, 4.0, 4.5, 4.0], dtype=np.float32),
    "int-and-float-objects": np.array([1, 1.0, 1.5, 2, 2.9], dtype=object),
    "bool": np.array([True, False, True, True, False]),
    "int": np.array([7, 3, 7, 9, 3]),
    "list-of-str": ["u1", "u2", "u1", "u3", "u2"],
    "float-tensor-integral": torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0]),
    "float-tensor-fractional": torch.tensor([0.5, 0.7, 0.5, 1.2, 0.7]),
    "int-tensor": torch.tensor([4, 4, 2, 2, 1]),
    "bool-tensor": torch.tensor([True, False, True, True, False]),
}


@pytest.mark.parametrize("uid", list(AS_TORCH_INDEX_CASES))
def test_grpo_vectorized_groups_as_verls_as_torch_index(uid):
    """verl's grpo_vectorized groups its uids with ``verl.utils.groupwise.as_torch_index``; the profile's groups of
    grpo_vectorized are the same partition, and its advantages verl's. Labels ``as_torch_index`` maps below 0
    (negative float uids here) make verl's ``group_mean_std`` raise ``IndexError``; the profile gives grpo's
    advantages of those groups (docs/parity-policy.md)."""
    from fastalign.integrations.verl.advantages import _group_keys
    from verl.utils.groupwise import as_torch_index

    index = AS_TORCH_INDEX_CASES[uid]
    ours = _group_keys("grpo_vectorized", index, 5, torch.device("cpu"))
    theirs = as_torch_index(index, device="cpu")
    assert _partition(ours) == _partition(theirs), uid
    r, _, mask, _, _ = _batch(seed=12, B=5)
    cfg = AlgoConfig(adv_estimator="grpo_vectorized")
    adv_f = fverl.compute_advantage(cfg, r, mask, index)[0]
    if bool((theirs < 0).any()):
        with pytest.raises(IndexError):
            _verl(cfg, r, mask, index)
        keys = torch.as_tensor(theirs) - theirs.min()
        _close(adv_f, _verl(AlgoConfig(adv_estimator="grpo"), r, mask, keys.numpy())[0], "grpo's advantages")
        return
    torch.testing.assert_close(adv_f, _verl(cfg, r, mask, index)[0].to(D), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("uid", ["numeric-strings", "float-fractional", "int-and-float-objects", "bool", "alpha"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "rloo_vectorized", "opo", "gpg", "reinforce_plus_plus_baseline"])
def test_dict_and_unique_grouping_as_verl(estimator, uid):
    """verl's loops key a dict by the raw uid ("1" and "01" apart, 1 and 1.0 together, floats by value);
    rloo_vectorized groups by ``np.unique``. A float array raised ``TypeError``; the advantages are verl's."""
    index = AS_TORCH_INDEX_CASES[uid]
    r, _, mask, _, _ = _batch(seed=13, B=5)
    cfg = AlgoConfig(adv_estimator=estimator)
    _close(fverl.compute_advantage(cfg, r, mask, index)[0], _verl(cfg, r, mask, index)[0], f"{estimator} {uid}")


@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("estimator", OTB)
def test_optimal_token_baseline_handle_zero_tail_as_verl(estimator, zero_tail):
    """``handle_zero_tail`` (verl's switch, default True) of compute_advantage: both values give verl's advantages
    and returns on a batch where the strictly longest response of a group has a tail; other estimators refuse
    ``handle_zero_tail=False``."""
    r, mask, old, p2, iw = _otb_inputs(seed=34)
    mask[0] = 1  # the strictly longest response of group p0 of str-with-singletons
    mask[[2, 5, 9], 4:] = 0
    index = UIDS["str-with-singletons"]
    cfg = AlgoConfig(adv_estimator=estimator)
    adv_v, ret_v = core_algos.get_adv_estimator_fn(estimator)(
        token_level_rewards=r.clone(), response_mask=mask, config=cfg, index=index, old_log_probs=old,
        sum_pi_squared=p2, rollout_is_weights=iw, handle_zero_tail=zero_tail)
    adv_f, ret_f = fverl.compute_advantage(cfg, r, mask, index, old_log_probs=old, sum_pi_squared=p2,
                                           rollout_is_weights=iw, handle_zero_tail=zero_tail)
    _close(adv_f, adv_v, f"{estimator} advantages")
    _close(ret_f, ret_v, f"{estimator} returns")
    other = fverl.compute_advantage(cfg, r, mask, index, old_log_probs=old, sum_pi_squared=p2,
                                    rollout_is_weights=iw, handle_zero_tail=not zero_tail)[0]
    assert not torch.allclose(other, adv_f), "handle_zero_tail does not bind on this batch"
    with pytest.raises(ValueError, match="handle_zero_tail"):
        fverl.compute_advantage(AlgoConfig(adv_estimator="grpo"), r, mask, index, handle_zero_tail=False)
    with pytest.raises(TypeError, match="handle_zero_tail"):
        fverl.compute_advantage(cfg, r, mask, index, old_log_probs=old, sum_pi_squared=p2, handle_zero_tail=1)
