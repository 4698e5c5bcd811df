"""verl 0.9.1 advantage estimators registered as ``fastalign_<name>``, against verl's installed
``core_algos``: DataProto's object arrays for gdpo, fractional masks, grpo_passk's group-size check without
a host read, verl's signatures, and ties at an infinite top score in grpo_passk."""
import collections
import inspect

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl is not installed: `pip install --no-deps verl==0.9.1` (see the Makefile)")

from verl.trainer.config import AlgoConfig  # noqa: E402

import fastalign.integrations.verl.plugin  # noqa: E402,F401  (registers fastalign_<name>)

REG = core_algos.ADV_ESTIMATOR_REGISTRY
D = torch.float64
INF, NAN = float("inf"), float("nan")


def _clone(kw):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}


class _Ops(TorchDispatchMode):
    """Counts the aten ops run under it (and makes fastalign take its no-host-read path)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func).split(".")[1]] += 1
        return func(*args, **(kwargs or {}))


_HOST_READS = ("_local_scalar_dense", "_unique2", "unique_dim", "nonzero", "unique_consecutive")


def _gdpo_kw(columns):
    B, T, P = 4, 3, 2
    r = torch.zeros(B, T, dtype=D)
    m = torch.ones(B, T, dtype=D)
    uid = np.array(["a", "a", "b", "b"], dtype=object)
    batch = {"prompts": torch.zeros(B, P, dtype=torch.long),
             "attention_mask": torch.cat([torch.ones(B, P), m.float()], 1).long()}
    cfg = AlgoConfig(adv_estimator="gdpo", gdpo_reward_keys=list(columns), gdpo_reward_weights=[1.0, 0.5])
    return dict(token_level_rewards=r, response_mask=m, index=uid, config=cfg,
                non_tensor_batch={"uid": uid, **columns}, batch=batch)


@pytest.mark.parametrize("fmt", [[0.2, 0.9, 0.5, 0.4], [0.2, 0.9, None, 0.4]], ids=["floats", "none"])
def test_gdpo_object_array_components_match_verl(fmt):
    """DataProto keeps reward components as numpy arrays of dtype object (a missing one as None): read as
    verl reads them (np.float32, None -> NaN)."""
    kw = _gdpo_kw({"acc": np.array([1.0, 0.0, 1.0, 1.0], dtype=object), "fmt": np.array(fmt, dtype=object)})
    adv_v, _ = REG["gdpo"](**_clone(kw))
    adv_f, _ = REG["fastalign_gdpo"](**kw)
    torch.testing.assert_close(adv_f.to(D), adv_v.to(D), atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.isnan(adv_f).all() == (None in fmt)


def test_gdpo_component_that_is_not_numbers_names_the_key():
    kw = _gdpo_kw({"acc": np.array([1.0, 0.0, 1.0, 1.0], dtype=object),
                   "fmt": np.array(["x", 0.9, 0.5, 0.4], dtype=object)})
    with pytest.raises(ValueError, match="gdpo_reward_keys.*'fmt'"):
        REG["fastalign_gdpo"](**kw)


_R = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -1.0], [0.5, -1.0, 0.0], [2.0, 0.0, 1.0]], dtype=D)
_FRACTIONAL = torch.tensor([[0.5, 0.5, 1.0], [1.0, 1.0, 1.0], [1.0, 0.25, 0.0], [1.0, 1.0, 1.0]], dtype=D)
_UID = np.array(["a", "a", "b", "b"], dtype=object)


def _call(name, mask, r=_R):
    """``fastalign_<name>`` (or verl's ``name``) with what each takes, as keywords."""
    est = name.removeprefix("fastalign_")
    kw = dict(token_level_rewards=r.clone(), response_mask=mask)
    if est == "gae":
        kw.update(values=torch.zeros_like(r), gamma=1.0, lam=1.0)
    elif "optimal_token_baseline" in est:
        g = torch.Generator().manual_seed(0)
        kw.update(index=_UID, old_log_probs=-torch.rand(r.shape, generator=g, dtype=D),
                  sum_pi_squared=torch.rand(r.shape, generator=g, dtype=D))
    else:
        kw["config"] = AlgoConfig(adv_estimator=est)
        if est == "remax":
            kw["reward_baselines"] = torch.tensor([0.5, 0.0, -0.5, 1.0], dtype=D)
        elif est != "reinforce_plus_plus":
            kw["index"] = _UID
    return REG[name](**kw)


_REFUSE_FRACTIONAL = ("gae", "reinforce_plus_plus", "remax", "reinforce_plus_plus_baseline", "gdpo",
                      "optimal_token_baseline", "tir_optimal_token_baseline")


@pytest.mark.parametrize("est", _REFUSE_FRACTIONAL)
def test_fractional_mask_is_refused_where_verl_weighs_tokens(est):
    """verl weighs a token by a fractional mask inside these estimators; fastalign would count it as valid."""
    with pytest.raises(ValueError, match="response_mask"):
        _call("fastalign_" + est, _FRACTIONAL)
    with _Ops():  # no host read: the advantages and returns are NaN instead
        adv, ret = _call("fastalign_" + est, _FRACTIONAL)
    assert torch.isnan(adv).all() and torch.isnan(ret).all()
    adv, _ = _call("fastalign_" + est, (_FRACTIONAL != 0).to(D))  # a 0/1 mask passes
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("est", ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg", "grpo_passk"])
def test_fractional_mask_matches_verl_where_it_scales_the_advantage(est):
    adv_v, _ = _call(est, _FRACTIONAL)
    adv_f, _ = _call("fastalign_" + est, _FRACTIONAL)
    torch.testing.assert_close(adv_f.to(D), adv_v.to(D), atol=1e-6, rtol=1e-6)


def test_grpo_passk_group_check_reads_nothing_from_a_tensor_index():
    """A tensor index: no host read of the group sizes (verl's uids as a numpy array are read on the host)."""
    r = torch.zeros(6, 2, dtype=D)
    r[:, -1] = torch.tensor([1.0, 0.0, 2.0, 3.0, 0.5, 0.0], dtype=D)
    m = torch.ones(6, 2, dtype=D)
    cfg = AlgoConfig(adv_estimator="grpo_passk")
    for uid, ok in ((torch.tensor([0, 0, 1, 1, 2, 2]), True), (torch.tensor([0, 0, 1, 1, 1, 2]), False)):
        rec = _Ops()
        with rec:
            adv, _ = REG["fastalign_grpo_passk"](r, m, uid, config=cfg)
        assert not [op for op in rec.ops if op in _HOST_READS], rec.ops
        assert torch.isfinite(adv).all() == ok and (ok or torch.isnan(adv).all())
    with pytest.raises(ValueError, match="index.*group 2"):  # host ids: verl's ValueError
        REG["fastalign_grpo_passk"](r, m, np.array([0, 0, 1, 1, 1, 2]), config=cfg)
    with pytest.raises(ValueError, match="index.*group 'c'"):
        REG["fastalign_grpo_passk"](r, m, ["a", "a", "b", "b", "b", "c"], config=cfg)


@pytest.mark.parametrize("scores", [[INF, INF, 0.0, 1.0, 2.0, 3.0], [-INF, 0.0, 0.0, NAN, NAN, 1.0],
                                    [0.0, INF, INF, 5.0, 5.0, 1.0]], ids=["inf-tie", "neg-inf", "later-tie"])
def test_grpo_passk_ties_at_an_infinite_top_match_verl(scores):
    """verl's topk gives the non-finite advantage of tied top responses to one of them."""
    r = torch.zeros(6, 2)
    r[:, -1] = torch.tensor(scores)
    m = torch.ones(6, 2)
    uid = np.array(["a"] * 3 + ["b"] * 3, dtype=object)
    cfg = AlgoConfig(adv_estimator="grpo_passk")
    adv_v, _ = REG["grpo_passk"](r.clone(), m, uid, config=cfg)
    adv_f, _ = REG["fastalign_grpo_passk"](r, m, uid, config=cfg)
    torch.testing.assert_close(adv_f, adv_v, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("est", ["grpo", "grpo_vectorized"])
def test_grpo_signature_is_verls(est):
    """verl's grpo functions take no **kwargs: a misspelt option is a TypeError on both sides."""
    verl_fn = {"grpo": core_algos.compute_grpo_outcome_advantage,
               "grpo_vectorized": core_algos.compute_grpo_vectorized_outcome_advantage}[est]
    fa_fn = REG["fastalign_" + est]
    assert list(inspect.signature(fa_fn).parameters) == list(inspect.signature(verl_fn).parameters)
    r = torch.zeros(4, 3)
    r[:, -1] = torch.tensor([1.0, 0.0, 3.0, 1.0])
    m = torch.ones(4, 3)
    for extra in (dict(norm_adv_by_std=False), dict(gamma=0.5)):
        with pytest.raises(TypeError):
            verl_fn(r.clone(), m, _UID, **extra)
        with pytest.raises(TypeError):
            fa_fn(r, m, _UID, **extra)


def test_gamma_keyword_is_refused_where_verl_ignores_it():
    """verl's reinforce_plus_plus reads config.gamma and ignores a gamma keyword (its **kwargs)."""
    r = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    m = torch.ones(2, 3)
    cfg = AlgoConfig(gamma=1.0)
    with pytest.raises(ValueError, match="gamma"):
        REG["fastalign_reinforce_plus_plus"](r, m, config=cfg, gamma=0.5)
    with pytest.raises(ValueError, match="lam"):
        REG["fastalign_rloo"](r, m, np.array(["a", "a"]), config=cfg, lam=0.0)
    _, ret_v = REG["reinforce_plus_plus"](r.clone(), m, config=cfg)
    _, ret_f = REG["fastalign_reinforce_plus_plus"](r, m, config=cfg)
    torch.testing.assert_close(ret_f, ret_v)
