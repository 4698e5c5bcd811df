"""The ``verl.plugins`` entry point: fastalign's losses and estimators in verl 0.9.1's registries.

* A fresh interpreter that runs ``import verl`` alone finds every ``fastalign_<name>`` in
  ``get_policy_loss_fn`` / ``get_adv_estimator_fn`` (the installed entry point is what loads them).
* For every loss mode, verl's registry dispatch to ``fastalign_<mode>`` equals verl's own
  ``<mode>`` called the way verl's actor calls it (``verl.workers.utils.losses.ppo_loss``: keyword
  arguments, ``config.global_batch_info`` filled): loss, d(loss)/d(log_prob) and the metrics.
* For every estimator, ``fastalign_<name>`` equals verl's ``<name>`` called with the keywords of
  ``ray_trainer.compute_advantage``.
"""
import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import assert_close, policy_batch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not importable")
actor_config = pytest.importorskip("verl.workers.config.actor", reason="verl is not importable")

from verl.trainer.config import AlgoConfig  # noqa: E402

from fastalign.integrations.verl import plugin  # noqa: E402

MODES = [n[len(plugin.PREFIX):] for n in plugin.POLICY_LOSSES]
ESTIMATORS = [n[len(plugin.PREFIX):] for n in plugin.ADVANTAGE_ESTIMATORS]
FASTALIGN_ONLY = {"grpo_batch_std"}  # estimators verl has no name for


def test_import_verl_alone_registers_everything():
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo import core_algos as c\n"
        f"modes, ests = {MODES!r}, {ESTIMATORS!r}\n"
        "for m in modes:\n"
        "    assert c.get_policy_loss_fn('fastalign_' + m).__module__ == 'fastalign.integrations.verl.plugin', m\n"
        "for e in ests:\n"
        "    assert c.get_adv_estimator_fn('fastalign_' + e).__module__ == 'fastalign.integrations.verl.plugin', e\n"
        "from verl.utils.experimental import torch_functional as tf\n"
        "assert type(tf.FusedLinearForPPO(impl_backend='fastalign')).__module__ == 'fastalign.integrations.verl.fused'\n"
        "assert type(tf.FusedLinearForPPO(impl_backend='torch')).__module__ == tf.__name__\n"
        "from verl.models.transformers import monkey_patch as mp\n"
        "assert mp.patch_forward_with_backends.fastalign_wrapped\n"
        "print('registered', len(modes), len(ests))\n")
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"registered {len(MODES)} {len(ESTIMATORS)}" in out.stdout


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="verl.plugins") if ep.name == "fastalign"]
    assert len(eps) == 1 and eps[0].value == "fastalign.integrations.verl.plugin"


def test_every_verl_mode_and_estimator_is_covered():
    skipped = {"bypass_mode"}  # a rollout-correction mode, not a loss fastalign reproduces
    verl_modes = {m for m in core_algos.POLICY_LOSS_REGISTRY if not m.startswith(plugin.PREFIX)} - skipped
    assert set(MODES) == verl_modes, set(MODES) ^ verl_modes
    assert set(ESTIMATORS) - FASTALIGN_ONLY == {e.value for e in core_algos.AdvantageEstimator}


def test_register_is_idempotent():
    before = dict(core_algos.POLICY_LOSS_REGISTRY), dict(core_algos.ADV_ESTIMATOR_REGISTRY)
    plugin.register()
    plugin.register()
    assert before == (dict(core_algos.POLICY_LOSS_REGISTRY), dict(core_algos.ADV_ESTIMATOR_REGISTRY))
    assert core_algos.get_policy_loss_fn("fastalign_vanilla") is plugin.POLICY_LOSSES["fastalign_vanilla"]


def test_registered_functions_pickle_as_themselves():
    """verl's registries hold functions that pickle (a spawned worker, a saved trainer state): ours too, by
    reference to the plugin module's attribute of the function's name."""
    fns = [core_algos.get_policy_loss_fn(m) for m in plugin.POLICY_LOSSES]
    fns += [core_algos.get_adv_estimator_fn(e) for e in plugin.ADVANTAGE_ESTIMATORS]
    for fn in fns:
        assert pickle.loads(pickle.dumps(fn)) is fn, fn.__name__


# ---------------------------------------------------------------------------------------------
# policy losses


def _actor(loss_mode, policy_loss=None, **kw):
    pl = actor_config.PolicyLossConfig(loss_mode=loss_mode, **(policy_loss or {}))
    return actor_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=pl,
                                    **kw)


#: per mode: (actor options, policy_loss options); each runs with and without importance weights,
#: locally and with data-parallel global counts.
POLICY_CASES = {
    "vanilla": (dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5), {}),
    "gspo": (dict(clip_ratio_low=0.01, clip_ratio_high=0.02), {}),
    "sapo": (dict(tau_neg=1.3), {}),
    "gpg": ({}, {}),
    "clip_cov": ({}, dict(clip_cov_ratio=1.0, clip_cov_lb=-1.0, clip_cov_ub=5.0)),
    "kl_cov": ({}, dict(kl_cov_ratio=0.1, ppo_kl_coef=0.1)),
    "geo_mean": (dict(clip_ratio_low=0.1, clip_ratio_high=0.15), {}),
    "cispo": (dict(clip_ratio_low=0.1, clip_ratio_high=0.1), {}),
    "dppo_tv": (dict(clip_ratio_low=0.05, clip_ratio_high=0.03, clip_ratio_c=1.1), {}),
    "dppo_kl": (dict(clip_ratio_low=0.01, clip_ratio_high=0.02, clip_ratio_c=1.2), {}),
    "dro": ({}, dict(dro_beta=0.5)),
}
AGG = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _policy_batch(seed, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    lp, old, A, m = policy_batch(g, B, T)
    w = torch.rand(B, T, generator=g) + 0.5
    return lp, old, A, m, w  # float32, what verl's actor feeds its loss


def _dispatch(name, actor, lp, old, A, m, w, agg):
    x = lp.clone().requires_grad_(True)
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=old, log_prob=x, advantages=A, response_mask=m, loss_agg_mode=agg, config=actor,
        rollout_is_weights=w)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _set_global(actor, dp, m):
    n_tok, n_seq = int(m.sum()), int((m.sum(-1) > 0).sum())
    info = dict(dp_size=2, batch_num_tokens=2 * n_tok + 3, global_batch_size=2 * n_seq + 1) if dp else \
        dict(dp_size=1, batch_num_tokens=None, global_batch_size=None)
    actor.global_batch_info.update(info, loss_scale_factor=actor.loss_scale_factor)


def _check_against_verl(mode, make_actor, dp, batch, agg, what):
    """verl's ``mode`` and ``fastalign_<mode>`` through verl's registry on ``batch = (lp, old, A, m, w)``, each on
    an actor config of its own from ``make_actor``: the same loss, d(loss)/d(log_prob) and metrics (Python floats,
    as verl's modes return them)."""
    lp, old, A, m, w = batch
    out = []
    for name in (mode, plugin.PREFIX + mode):
        actor = make_actor()
        _set_global(actor, dp, m)
        out.append(_dispatch(name, actor, lp, old, A, m, w, agg))
    (vl, vg, vm), (fl, fg, fm) = out
    assert_close(fl, vl, atol=1e-6, rtol=1e-5, what=f"{what} loss")
    assert_close(fg, vg, atol=1e-6, rtol=1e-5, what=f"{what} d log_prob")
    assert set(fm) == set(vm), (sorted(fm), sorted(vm))
    for k, v in vm.items():
        assert type(fm[k]) is type(v) is float, (k, type(fm[k]), type(v))
        assert_close(torch.tensor(fm[k]), torch.tensor(v), atol=1e-6, rtol=1e-5, what=f"{what} metric {k}")


@pytest.mark.parametrize("dp", [False, True], ids=["local", "dp2"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "is_weights"])
@pytest.mark.parametrize("agg", AGG)
@pytest.mark.parametrize("mode", sorted(POLICY_CASES))
def test_registry_policy_loss_equals_verl(mode, agg, weighted, dp):
    opts, pl = POLICY_CASES[mode]
    lsf = dict(loss_scale_factor=16) if agg == "seq-mean-token-sum-norm" and dp else {}
    seed = sorted(POLICY_CASES).index(mode) * 10 + AGG.index(agg)
    lp, old, A, m, w = _policy_batch(seed)
    w = w if weighted else None
    if mode == "kl_cov":  # ties in the covariance are broken differently from verl's torch.topk
        v = m.bool()
        cov = (A[v].double() - A[v].double().mean()) * (lp[v].double() - lp[v].double().mean())
        assert torch.unique(cov).numel() == cov.numel(), "tied covariances in the kl_cov data"
    _check_against_verl(mode, lambda: _actor(plugin.PREFIX + mode, pl, loss_agg_mode=agg, **opts, **lsf), dp,
                        (lp, old, A, m, w), agg, what=mode)


def test_policy_loss_clipping_is_exercised():
    lp, old, A, m, w = _policy_batch(7)
    old = lp - 2.0  # ratio e^2: clipped where A > 0, past the dual clip where A < 0
    actor = _actor("fastalign_vanilla")
    _set_global(actor, False, m)
    _, _, vm = _dispatch("vanilla", actor, lp, old, A, m, None, "token-mean")
    _, _, fm = _dispatch("fastalign_vanilla", actor, lp, old, A, m, None, "token-mean")
    assert vm["actor/pg_clipfrac"] > 0 and vm["actor/pg_clipfrac_lower"] > 0
    for k in vm:
        assert_close(torch.tensor(fm[k]), torch.tensor(vm[k]), atol=1e-6, what=k)
    from verl.utils.metric import AggregationType, Metric  # what verl's actor (workers.utils.losses) does with them

    ours, theirs = (Metric.from_dict(x, aggregation=AggregationType.MEAN) for x in (fm, vm))
    for k in vm:
        assert ours[k].aggregate() == pytest.approx(theirs[k].aggregate(), abs=1e-6), k


def test_bypass_mode_replaces_the_loss_mode():
    """verl 0.9.1 has no rollout-correction registry to add loss modes to: its bypass mode sets
    ``policy_loss.loss_mode="bypass_mode"`` (verl's own PPO-clip / REINFORCE on pi / pi_rollout),
    whatever mode was configured, fastalign's included (what docs/integrations.md states)."""
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

    lp, old, _, _, _ = _policy_batch(3)
    batch = DataProto.from_dict(tensors={"rollout_log_probs": old, "old_log_probs": lp})
    policy_loss = OmegaConf.create({"loss_mode": "fastalign_vanilla"})
    apply_bypass_mode(batch, OmegaConf.create({"bypass_mode": True, "loss_type": "ppo_clip"}), policy_loss)
    assert policy_loss.loss_mode == "bypass_mode" and torch.equal(batch.batch["old_log_probs"], old)
    assert core_algos.get_policy_loss_fn("bypass_mode").__module__ == core_algos.__name__
    assert [m for m in core_algos.POLICY_LOSS_REGISTRY if "bypass" in m] == ["bypass_mode"]


def test_policy_loss_needs_config():
    lp, old, A, m, _ = _policy_batch(0)
    with pytest.raises(ValueError, match="config"):
        core_algos.get_policy_loss_fn("fastalign_vanilla")(old, lp, A, m, "token-mean", None)
    actor = _actor("fastalign_dro")
    with pytest.raises(ValueError, match="dro_beta"):
        core_algos.get_policy_loss_fn("fastalign_dro")(old, lp, A, m, "token-mean", actor)


#: (config kind, loss_scale_factor attribute, global_batch_info entries): the divisor of seq-mean-token-sum-norm
#: comes from global_batch_info alone in verl's modes (agg_loss(**config.global_batch_info)), whatever the attribute
LSF_SOURCES = {
    "distillation_config": ("distillation", None, dict(loss_scale_factor=64)),  # no loss_scale_factor field
    "info_only": ("actor", None, dict(loss_scale_factor=64)),
    "info_wins_over_attribute": ("actor", 16, dict(loss_scale_factor=64)),
    "attribute_without_info": ("actor", 16, {}),  # verl divides by the padded length
    "info_none": ("actor", 16, dict(loss_scale_factor=None)),
}


@pytest.mark.parametrize("dp", [False, True], ids=["local", "dp2"])
@pytest.mark.parametrize("mode, source", [(mode, source) for source in sorted(LSF_SOURCES)
                                          for mode in ("vanilla", "gspo", "dppo_kl", "cispo")
                                          # verl's distillation loss runs vanilla only
                                          if LSF_SOURCES[source][0] == "actor" or mode == "vanilla"])
def test_registry_loss_scale_factor_from_global_batch_info_as_verl(mode, source, dp):
    """``fastalign_<mode>`` with seq-mean-token-sum-norm reads ``loss_scale_factor`` where verl's mode reads it,
    ``config.global_batch_info`` (verl's distillation loss hands its modes a config with no such attribute)."""
    from verl.workers.config.distillation import DistillationLossConfig

    kind, attribute, info = LSF_SOURCES[source]
    agg = "seq-mean-token-sum-norm"
    opts, pl = POLICY_CASES[mode]
    lp, old, A, m, w = _policy_batch(90 + sorted(LSF_SOURCES).index(source))
    n_seq = int((m.sum(-1) > 0).sum())
    counts = dict(dp_size=2, batch_num_tokens=2 * int(m.sum()) + 3, global_batch_size=2 * n_seq + 1) if dp else {}
    out = []
    for name in (mode, plugin.PREFIX + mode):
        if kind == "distillation":
            config = DistillationLossConfig()
        else:
            config = _actor(plugin.PREFIX + mode, pl, loss_agg_mode=agg, loss_scale_factor=attribute, **opts)
        config.global_batch_info.update(counts, **info)
        out.append(_dispatch(name, config, lp, old, A, m, w, agg))
    (vl, vg, vm), (fl, fg, fm) = out
    assert_close(fl, vl, atol=1e-6, rtol=1e-5, what=f"{mode} loss")
    assert_close(fg, vg, atol=1e-6, rtol=1e-5, what=f"{mode} d log_prob")
    for k, v in vm.items():
        assert_close(torch.tensor(fm[k]), torch.tensor(v), atol=1e-6, rtol=1e-5, what=f"{mode} metric {k}")


def test_registry_bad_loss_agg_mode_names_verls_key():
    """A bad ``loss_agg_mode`` argument is reported under verl's name (verl's own mode: ``Invalid loss_agg_mode``)."""
    lp, old, A, m, _ = _policy_batch(1)
    actor = _actor("fastalign_vanilla")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        core_algos.get_policy_loss_fn("vanilla")(old, lp, A, m, "token_mean", actor)
    with pytest.raises(ValueError, match="^loss_agg_mode must be one of .*got 'token_mean'"):
        core_algos.get_policy_loss_fn("fastalign_vanilla")(old, lp, A, m, "token_mean", actor)


# ---------------------------------------------------------------------------------------------
# advantage estimators

D = torch.float64


def _adv_batch(seed=0, B=12, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(D)
    mask[4] = 0  # an empty response
    scores = torch.randn(B, generator=g, dtype=D) * 2
    r = torch.zeros(B, T, dtype=D)
    r[torch.arange(B), (lengths - 1).clamp(min=0)] = scores
    r = r * mask
    token_r = torch.randn(B, T, generator=g, dtype=D) * mask
    values = torch.randn(B, T, generator=g, dtype=D)
    baselines = torch.randn(B, generator=g, dtype=D)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3.0
    p2 = torch.exp(old) ** 2 + torch.rand(B, T, generator=g, dtype=D) * 0.3
    iw = torch.rand(B, T, generator=g, dtype=D) + 0.5
    uid = np.array(["p0", "p1", "p0", "p2", "p1", "p0", "p3", "p2", "p1", "p0", "p2", "p1"], dtype=object)
    return dict(r=r, token_r=token_r, mask=mask, values=values, baselines=baselines, old=old, p2=p2, iw=iw, uid=uid)


def _trainer_kwargs(est, cfg, d):
    """The keywords verl's ray_trainer.compute_advantage passes to a registered estimator."""
    token_level = est in ("reinforce_plus_plus", "remax", "optimal_token_baseline", "tir_optimal_token_baseline")
    kw = dict(token_level_rewards=(d["token_r"] if token_level else d["r"]).clone(), response_mask=d["mask"],
              config=cfg, index=d["uid"])
    if est == "remax":
        kw["reward_baselines"] = d["baselines"]
    if est.endswith("optimal_token_baseline"):
        kw.update(old_log_probs=d["old"], sum_pi_squared=d["p2"], rollout_is_weights=d["iw"])
    return kw


def _valid(x, mask):
    return torch.where(mask > 0, x, torch.zeros_like(x))


# norm_adv_by_std_in_grpo=False reaches verl's grpo and grpo_passk only
@pytest.mark.parametrize("est, norm", [(e, True) for e in sorted(set(ESTIMATORS) - {"gae", "gdpo"} - FASTALIGN_ONLY)]
                         + [("grpo", False), ("grpo_passk", False)])
def test_registry_estimator_equals_verl(est, norm):
    d = _adv_batch(seed=ESTIMATORS.index(est))
    if est == "grpo_passk":  # pass@k needs groups of two or more
        d["uid"] = np.array(["a", "b", "c"] * 4, dtype=object)
    cfg = AlgoConfig(adv_estimator=plugin.PREFIX + est, gamma=0.95, norm_adv_by_std_in_grpo=norm)
    kw = _trainer_kwargs(est, cfg, d)
    if est == "grpo":  # verl's trainer calls its own grpo with the flag as an argument
        verl_kw = {k: v for k, v in kw.items() if k != "config"}
        v_adv, v_ret = core_algos.get_adv_estimator_fn(est)(norm_adv_by_std_in_grpo=norm, **verl_kw)
    else:
        v_adv, v_ret = core_algos.get_adv_estimator_fn(est)(**{**kw, "token_level_rewards": kw["token_level_rewards"]
                                                              .clone()})
    f_adv, f_ret = core_algos.get_adv_estimator_fn(plugin.PREFIX + est)(**kw)
    m = d["mask"]
    assert_close(_valid(f_adv, m), _valid(v_adv, m), atol=1e-6, rtol=1e-6, what=f"{est} advantages")
    assert_close(_valid(f_ret, m), _valid(v_ret, m), atol=1e-6, rtol=1e-6, what=f"{est} returns")


def test_registry_gae_equals_verl():
    d = _adv_batch(seed=3)
    v = core_algos.compute_gae_advantage_return(token_level_rewards=d["token_r"], values=d["values"],
                                                response_mask=d["mask"], gamma=0.9, lam=0.8)
    f = core_algos.get_adv_estimator_fn("fastalign_gae")(token_level_rewards=d["token_r"], values=d["values"],
                                                          response_mask=d["mask"], gamma=0.9, lam=0.8)
    for a, b, what in zip(f, v, ("advantages", "returns")):
        assert_close(_valid(a, d["mask"]), _valid(b, d["mask"]), atol=1e-6, rtol=1e-6, what=f"gae {what}")
    with pytest.raises(ValueError, match="values"):  # what verl's trainer would pass it
        core_algos.get_adv_estimator_fn("fastalign_gae")(token_level_rewards=d["token_r"], response_mask=d["mask"],
                                                          config=AlgoConfig(adv_estimator="fastalign_gae"))


@pytest.mark.parametrize("weights", [None, [1.0, 0.5]], ids=["unweighted", "weighted"])
def test_registry_gdpo_equals_verl(weights):
    d = _adv_batch(seed=5)
    B, T = d["mask"].shape
    g = torch.Generator().manual_seed(9)
    comps = {"fmt": (torch.rand(B, generator=g) > 0.5).float().numpy(), "acc": torch.randn(B, generator=g).numpy()}
    prompts = torch.zeros(B, 3, dtype=torch.long)
    attn = torch.cat([torch.ones(B, 3), d["mask"]], dim=1).long()  # response length from the attention mask
    attn[4, 3] = 1  # verl reads the last valid position, even of an empty response
    out = []
    for name in ("gdpo", "fastalign_gdpo"):
        cfg = AlgoConfig(adv_estimator=name, gdpo_reward_keys=["fmt", "acc"], gdpo_reward_weights=weights)
        out.append(core_algos.get_adv_estimator_fn(name)(
            token_level_rewards=d["r"].clone(), response_mask=d["mask"], config=cfg, index=d["uid"],
            non_tensor_batch=dict(comps, uid=d["uid"]), batch=dict(prompts=prompts, attention_mask=attn)))
    (v_adv, _), (f_adv, f_ret) = out
    assert_close(_valid(f_adv, d["mask"]), _valid(v_adv, d["mask"]), atol=1e-5, rtol=1e-5, what="gdpo advantages")
    assert torch.equal(f_adv, f_ret)


def _positional_args(est, d):
    """Arguments for every named parameter of verl's ``est``, in verl's order."""
    cfg = AlgoConfig(adv_estimator=est, gamma=0.9, norm_adv_by_std_in_grpo=True)
    grouped = (d["r"], d["mask"], d["uid"], 1e-2)
    if est in ("grpo", "grpo_vectorized", "grpo_passk"):
        return grouped + (False, cfg)  # the flag as the argument: Dr. GRPO (grpo_passk reads config only)
    if est == "gdpo":
        B = d["mask"].shape[0]
        g = torch.Generator().manual_seed(9)
        comps = {"fmt": (torch.rand(B, generator=g) > 0.5).float().numpy(), "acc": torch.randn(B, generator=g).numpy()}
        attn = torch.cat([torch.ones(B, 3), d["mask"]], dim=1).long()
        attn[4, 3] = 1  # verl reads the last valid position, even of an empty response
        cfg = AlgoConfig(adv_estimator=est, gdpo_reward_keys=["fmt", "acc"], gdpo_reward_weights=[1.0, 0.5])
        return grouped + (True, cfg, dict(comps, uid=d["uid"]),
                          dict(prompts=torch.zeros(B, 3, dtype=torch.long), attention_mask=attn))
    if est == "gpg":
        return grouped + (2.0, 1.0, cfg)  # f_norm, alpha
    if est in ("rloo", "rloo_vectorized", "opo", "reinforce_plus_plus_baseline"):
        return grouped + (cfg,)
    if est == "gae":
        return (d["token_r"], d["values"], d["mask"], 0.9, 0.8)
    if est == "reinforce_plus_plus":
        return (d["token_r"], d["mask"], cfg)
    if est == "remax":
        return (d["token_r"], d["baselines"], d["mask"], cfg)
    return (d["token_r"], d["mask"], d["uid"], d["old"], d["p2"], d["iw"], True, 1e-3)  # optimal token baselines


@pytest.mark.parametrize("est", sorted(set(ESTIMATORS) - FASTALIGN_ONLY))
def test_registry_estimator_positional_call_binds_as_verl(est):
    """``fastalign_<est>`` takes the named parameters of verl's ``<est>`` in verl's order, so the same
    positional call gives verl's results (``gpg``'s ``f_norm``, ``gae``'s ``values``, ``remax``'s baselines)."""
    import inspect

    verl_fn, fa_fn = core_algos.get_adv_estimator_fn(est), core_algos.get_adv_estimator_fn(plugin.PREFIX + est)
    named = lambda fn: [p.name for p in inspect.signature(fn).parameters.values()  # noqa: E731
                        if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert named(fa_fn) == named(verl_fn)
    d = _adv_batch(seed=ESTIMATORS.index(est) + 40)
    if est == "grpo_passk":  # pass@k needs groups of two or more
        d["uid"] = np.array(["a", "b", "c"] * 4, dtype=object)
    args = _positional_args(est, d)
    assert len(args) == len(named(verl_fn))
    v = verl_fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    f = fa_fn(*args)
    m = d["mask"]
    for a, b, what in zip(f, v, ("advantages", "returns")):
        assert_close(_valid(a, m), _valid(b, m), atol=1e-5, rtol=1e-5, what=f"{est} {what}")
    with pytest.raises(TypeError):  # more positional arguments than verl's function takes
        fa_fn(*args, *([None] * (9 - len(args))))


def test_inputs_verl_trainer_does_not_pass_raise():
    """verl 0.9.1's trainer passes these inputs only under its own estimator names."""
    d = _adv_batch(seed=2)
    for name in ("optimal_token_baseline", "tir_optimal_token_baseline", "gdpo", "remax"):
        cfg = AlgoConfig(adv_estimator=plugin.PREFIX + name, gdpo_reward_keys=["acc"] if name == "gdpo" else None)
        with pytest.raises(ValueError, match="old_log_probs|non_tensor_batch|reward_baselines"):
            core_algos.get_adv_estimator_fn(plugin.PREFIX + name)(token_level_rewards=d["r"], response_mask=d["mask"],
                                                                   config=cfg, index=d["uid"])


def test_registry_grpo_batch_std_equals_reference():
    """fastalign_grpo_batch_std, called with what verl's trainer passes a registered estimator, against
    (r - group mean) / (batch std + eps) in float64; a group of one gets 0."""
    d = _adv_batch(seed=4)
    d["uid"][6] = "alone"
    cfg = AlgoConfig(adv_estimator="fastalign_grpo_batch_std")
    adv, ret = core_algos.get_adv_estimator_fn("fastalign_grpo_batch_std")(**_trainer_kwargs("grpo", cfg, d))
    r = d["r"].sum(-1)
    mean = torch.stack([r[torch.from_numpy(d["uid"] == u)].mean() for u in d["uid"]])
    expected = ((r - mean) / (r.std() + 1e-6))[:, None] * d["mask"]
    assert expected[6].abs().sum() == 0 and expected.abs().sum() > 0
    assert_close(adv, expected, atol=1e-6, rtol=1e-6, what="grpo_batch_std advantages")
    assert torch.equal(adv, ret)
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo"):
        core_algos.get_adv_estimator_fn("fastalign_grpo_batch_std")(
            **_trainer_kwargs("grpo", AlgoConfig(adv_estimator="x", norm_adv_by_std_in_grpo=False), d))


@pytest.mark.parametrize("est", ["grpo_vectorized", "gdpo"])
def test_norm_flag_in_config_that_verl_ignores_is_refused(est):
    """verl's trainer hands norm_adv_by_std_in_grpo to its own grpo only; grpo_vectorized and gdpo never
    read it from config. A False there makes fastalign_<est> raise compute_advantage's ValueError (not
    Dr. GRPO numbers verl would not give); as an argument, verl's grpo_vectorized applies it, and so does
    fastalign_grpo_vectorized (fastalign_gdpo refuses it)."""
    from fastalign.integrations.verl import compute_advantage

    d = _adv_batch(seed=6)
    cfg = AlgoConfig(adv_estimator=est, norm_adv_by_std_in_grpo=False)
    with pytest.raises(ValueError) as expected:
        compute_advantage(cfg, d["r"], d["mask"], d["uid"])
    fn = core_algos.get_adv_estimator_fn(plugin.PREFIX + est)
    with pytest.raises(ValueError) as got:
        fn(**_trainer_kwargs(est, cfg, d))
    assert str(got.value) == str(expected.value)
    kw = dict(token_level_rewards=d["r"].clone(), response_mask=d["mask"], index=d["uid"], config=cfg)
    on, _ = fn(**kw, norm_adv_by_std_in_grpo=True)  # the argument decides, as in verl's function
    v_on, _ = core_algos.get_adv_estimator_fn(est)(**{**kw, "token_level_rewards": d["r"].clone()},
                                                   norm_adv_by_std_in_grpo=True)
    assert_close(_valid(on, d["mask"]), _valid(v_on, d["mask"]), atol=1e-6, rtol=1e-6, what=f"{est} flag True")
    if est == "gdpo":
        with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo"):
            fn(**kw, norm_adv_by_std_in_grpo=False)
    else:
        off, _ = fn(**kw, norm_adv_by_std_in_grpo=False)
        v_off, _ = core_algos.get_adv_estimator_fn(est)(**{**kw, "token_level_rewards": d["r"].clone()},
                                                        norm_adv_by_std_in_grpo=False)
        assert_close(_valid(off, d["mask"]), _valid(v_off, d["mask"]), atol=1e-6, rtol=1e-6, what=f"{est} flag False")


def test_norm_flag_from_argument_or_config():
    d = _adv_batch(seed=1)
    fn = core_algos.get_adv_estimator_fn("fastalign_grpo")
    off = AlgoConfig(adv_estimator="fastalign_grpo", norm_adv_by_std_in_grpo=False)
    a1, _ = fn(d["r"], d["mask"], d["uid"], config=off)
    a2, _ = fn(d["r"], d["mask"], d["uid"], norm_adv_by_std_in_grpo=False)
    v, _ = core_algos.compute_grpo_outcome_advantage(d["r"].clone(), d["mask"], d["uid"], norm_adv_by_std_in_grpo=False)
    assert_close(a1, v, atol=1e-6, what="flag from config")
    assert_close(a2, v, atol=1e-6, what="flag as argument")
    with pytest.raises(ValueError, match="alpha"):
        core_algos.get_adv_estimator_fn("fastalign_gpg")(d["r"], d["mask"], d["uid"], alpha=2.0)


# ---------------------------------------------------------------------------------------------
# fused log-prob / entropy backend (fused_kernel_options.impl_backend=fastalign)


def _fused_inputs(dtype, N=(2, 5), H=8, V=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    ids = torch.randint(0, V, N, generator=g)
    dlp, dent = torch.randn(*N, generator=g), torch.randn(*N, generator=g)
    return h, w, ids, dlp, dent


def _fused_run(module, h, w, ids, dlp, dent, temperature):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = module.forward(hidden_states=h, vocab_weights=w, input_ids=ids, temperature=temperature)
    (lp.float() * dlp + ent.float() * dent).sum().backward()
    return lp, ent, h.grad, w.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_backend_equals_verl_torch_backend(dtype, temperature, cpu_backend):
    from verl.utils.experimental import torch_functional as vtf

    import fastalign
    from fastalign.integrations.verl import fused

    h, w, ids, dlp, dent = _fused_inputs(dtype)
    verl_mod = vtf.FusedLinearForPPO(impl_backend="torch")
    ours = vtf.FusedLinearForPPO(impl_backend="fastalign")  # verl's factory, as its patched forward calls it
    assert isinstance(ours, fused.FusedLinearForPPO)
    v = _fused_run(verl_mod, h, w, ids, dlp, dent, temperature)
    with fastalign.use_backend(cpu_backend):
        f = _fused_run(ours, h, w, ids, dlp, dent, temperature)
    assert f[0].dtype == v[0].dtype == torch.float32 and f[1].dtype == v[1].dtype == dtype
    # verl's torch backend rounds the logits to the input dtype; fastalign accumulates in fp32
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for name, a, b in zip(("log_probs", "entropy", "d hidden", "d weight"), f, v):
        assert_close(a, b, **tol, what=f"fused {name}")
    if dtype == torch.bfloat16:  # and against fp32 logits of the same bf16 inputs, tightly
        ref = _fused_run(verl_mod, h.float(), w.float(), ids, dlp, dent, temperature)
        for name, a, b in zip(("log_probs", "entropy"), f[:2], ref[:2]):
            bf16_out = name == "entropy"  # returned in bf16, as verl does: one rounding
            assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-2 if bf16_out else 1e-5,
                         what=f"fused bf16 {name} vs fp32 logits")


def test_fused_backend_takes_the_dtype_of_verls_product(tmp_path):
    """An fp32 head beside bf16 hidden states: gathered from an FSDP2 shard (verl's default bf16 mixed precision
    keeps an untied head sharded apart, in fp32, and the fused forward reads it without calling it) or under
    torch.autocast, it is multiplied in bf16, as verl's non-fused path multiplies it (FSDP2's param_dtype cast, the
    autocast); its gradient reaches the fp32 shard. A plain fp32 head without autocast raises, as the product."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from fastalign.integrations.verl import fused

    h, w, ids, dlp, dent = _fused_inputs(torch.float32)
    h = h.bfloat16()
    module = fused.FusedLinearForPPO()
    want = _fused_run(module, h, w.bfloat16(), ids, dlp, dent, 0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _fused_run(module, h, w, ids, dlp, dent, 0.7)
    assert got[3].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=0)
    with pytest.raises(TypeError, match="weight"):
        module(h, w, ids)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard = torch.nn.Parameter(distribute_tensor(w, init_device_mesh("cpu", (1,)), [Shard(0)]))
        hg = h.clone().requires_grad_(True)
        lp, ent = module(hg, shard, ids, temperature=0.7)
        (lp.float() * dlp + ent.float() * dent).sum().backward()
    finally:
        dist.destroy_process_group()
    assert isinstance(shard.grad, DTensor) and shard.grad.dtype == torch.float32
    for a, b in zip((lp, ent, hg.grad, shard.grad.full_tensor()), want):
        torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=0)


def test_fused_backend_rejects_what_it_cannot_honour():
    from fastalign.integrations.verl import fused

    for bad in (0, -4):
        with pytest.raises(ValueError, match="chunk_size"):
            fused.FusedLinearForPPO(chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size"):
        fused.FusedLinearForPPO(chunk_size=2.5)
    with pytest.raises(ValueError, match="impl_backend"):
        fused.FusedLinearForPPO(impl_backend="torch")
    h, w, ids, _, _ = _fused_inputs(torch.float32)
    with pytest.raises(ValueError, match="input_ids"):
        fused.FusedLinearForPPO()(h, w, ids[:, :3])


def test_fused_backend_switch_through_verl_monkey_patch():
    """verl's forward patch with fused_kernels_backend='fastalign' on a tiny Qwen2 model gives the
    log-probs and entropies (and gradients) of its 'torch' backend. The patch is verl's
    ``patch_forward_with_backends``, the last step of ``apply_monkey_patch`` (whose earlier steps
    import a class that trl 1.16 no longer has)."""
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers import monkey_patch

    cfg = transformers.Qwen2Config(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).float()
    ids = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    cls = type(model)
    original_forward = cls.forward
    out = {}
    try:
        for backend in ("torch", "fastalign"):
            monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
            assert model._verl_fused_kernels_backend == backend
            model.zero_grad()
            res = model(input_ids=ids, attention_mask=attn, return_dict=True, temperature=0.9)
            (res.log_probs.sum() + 0.1 * res.entropy.sum()).backward()
            out[backend] = (res.log_probs.detach(), res.entropy.detach(), model.lm_head.weight.grad.clone(),
                            model.model.embed_tokens.weight.grad.clone())
    finally:
        cls.forward = original_forward
        for attr in ("_verl_fused_kernels_backend",):
            if hasattr(model, attr):
                delattr(model, attr)
    for name, a, b in zip(("log_probs", "entropy", "d lm_head", "d embed"), out["fastalign"], out["torch"]):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"patched model {name}")


def _tiny_causal_lm(kind):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32)
    if kind == "gemma2":
        cfg, cls = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **common), \
            transformers.Gemma2ForCausalLM
    elif kind == "cohere":
        cfg, cls = transformers.CohereConfig(logit_scale=0.25, **common), transformers.CohereForCausalLM
    elif kind == "inkling":  # a head padded past the vocabulary (its forward keeps the first 37 logits), muP scale
        cfg = transformers.AutoConfig.for_model(
            "inkling_text", **{**common, "vocab_size": 41}, unpadded_vocab_size=37, head_dim=8,
            logits_mup_width_multiplier=0.25, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=8,
            sliding_window_size=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
            rel_extent=16, d_rel=4)
        cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    else:
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits large enough for the softcap / scale to matter
    return model


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "inkling"])
def test_fused_backend_applies_the_models_head_transform(kind):
    """Gemma 2's final_logit_softcapping, Cohere's logit_scale and Inkling's muP scale over the first rows of its
    padded head: through verl's patched forward with impl_backend=fastalign, log-probs and entropy are those of the
    model's own logits (verl's non-fused path)."""
    from verl.models.transformers import monkey_patch

    model = _tiny_causal_lm(kind)
    ids = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(1))
    attn, temperature = torch.ones_like(ids), 0.8
    cls = type(model)
    original_forward = cls.forward
    try:
        with torch.no_grad():
            z = model(input_ids=ids, attention_mask=attn).logits.double() / temperature
            monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="fastalign")
            res = model(input_ids=ids, attention_mask=attn, return_dict=True, temperature=temperature)
            # a copy of the patched actor (an EMA or reference model) or one saved whole keeps the head transform
            # (deepcopy and pickle raised TypeError: the backend value is a str carrying it)
            own = model._verl_fused_kernels_backend
            for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
                got = other._verl_fused_kernels_backend
                assert (got, got.logit_scale, got.softcap, got.rows) == (own, own.logit_scale, own.softcap, own.rows)
                again = other(input_ids=ids, attention_mask=attn, return_dict=True, temperature=temperature)
                assert torch.equal(again.log_probs, res.log_probs)
    finally:
        cls.forward = original_forward
    logp = torch.log_softmax(z, dim=-1)
    ref_lp = logp.gather(-1, torch.roll(ids, -1, dims=-1).unsqueeze(-1)).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    assert_close(res.log_probs.double(), ref_lp, atol=1e-5, rtol=1e-5, what=f"{kind} fused log_probs")
    assert_close(res.entropy.double(), ref_ent, atol=1e-5, rtol=1e-5, what=f"{kind} fused entropy")


def test_fused_backend_refuses_an_architecture_without_a_known_head_transform():
    from verl.models.transformers import monkey_patch

    model = _tiny_causal_lm("qwen2")
    model.config.model_type = "qwen2_custom"  # not in fastalign.integrations.hf.HEAD_TRANSFORMS
    cls = type(model)
    original_forward = cls.forward
    try:
        with pytest.raises(ValueError, match="qwen2_custom.*register_head_transform"):
            monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="fastalign")
        assert cls.forward is original_forward and not hasattr(model, "_verl_fused_kernels_backend")
    finally:
        cls.forward = original_forward


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe",
                                        "qwen3_5", "qwen3_5_moe", "gemma3"])
def test_fused_backend_scores_verls_multimodal_models_with_their_plain_head(model_type):
    """verl gives these their own fused forward; their transformers forward is ``lm_head(hidden)`` alone (read in
    its source here), so the fastalign backend takes them with no transform instead of refusing them."""
    import inspect

    import transformers

    from fastalign.integrations.hf import head_transform

    config = transformers.AutoConfig.for_model(model_type)
    assert head_transform(config) == (1.0, None)
    model_class = transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    source = inspect.getsource(model_class.forward)
    assert "logits = self.lm_head(hidden_states)" in source
    assert not any(word in source for word in ("softcap", "logit_scale", "logits_scaling"))


def test_verls_fused_linear_stays_a_class():
    from verl.utils.experimental import torch_functional as vtf

    from fastalign.integrations.verl import fused

    verl_class = vtf.FusedLinearForPPO.verl_class
    assert isinstance(vtf.FusedLinearForPPO, type) and issubclass(vtf.FusedLinearForPPO, verl_class)
    theirs = vtf.FusedLinearForPPO(chunk_size=64, impl_backend="torch")
    assert isinstance(theirs, vtf.FusedLinearForPPO) and theirs.chunk_size == 64

    class Sub(vtf.FusedLinearForPPO):
        pass

    assert isinstance(Sub(), verl_class)
    ours = vtf.FusedLinearForPPO(chunk_size=4, impl_backend="fastalign")  # chunking does not change the result
    assert isinstance(ours, fused.FusedLinearForPPO) and ours.chunk_size == 4
    h, w, ids, _, _ = _fused_inputs(torch.float32)
    for a, b in zip(ours(h, w, ids), fused.FusedLinearForPPO()(h, w, ids)):
        assert torch.equal(a, b)


def test_grpo_passk_reads_its_flag_from_config_as_verl():
    """verl's grpo_passk reads norm_adv_by_std_in_grpo from config and ignores its argument; fastalign_grpo_passk
    let the argument win (a different advantage for config True, argument False). It follows verl now."""
    d = _adv_batch(seed=5)
    d["uid"] = np.array(["a", "b", "c"] * 4, dtype=object)
    cfg = AlgoConfig(adv_estimator="fastalign_grpo_passk", norm_adv_by_std_in_grpo=True)
    kw = _trainer_kwargs("grpo_passk", cfg, d)
    v_adv, _ = core_algos.get_adv_estimator_fn("grpo_passk")(norm_adv_by_std_in_grpo=False, **kw)
    f_adv, _ = core_algos.get_adv_estimator_fn("fastalign_grpo_passk")(norm_adv_by_std_in_grpo=False, **kw)
    assert_close(_valid(f_adv, d["mask"]), _valid(v_adv, d["mask"]), atol=1e-6, rtol=1e-6, what="grpo_passk")


def test_the_direct_api_takes_the_registered_names():
    """The config that selects a registered entry (adv_estimator="fastalign_grpo", loss_mode="fastalign_vanilla")
    raised in the direct API; the prefixed and plain names give one profile."""
    from fastalign.integrations.verl import VerlPolicyLoss, algo_options, verl_policy_config
    assert algo_options(AlgoConfig(adv_estimator="fastalign_grpo"))["adv_estimator"] == "grpo"
    prefixed, plain = _actor("fastalign_vanilla"), _actor("vanilla")
    assert verl_policy_config(prefixed) == verl_policy_config(plain)
    assert VerlPolicyLoss(prefixed).mode == "vanilla"


def test_gspo_passes_no_gradient_through_a_nan_sequence_ratio():
    """A NaN log-prob makes the sequence ratio NaN; verl's torch.clamp(max=10) passes no gradient through it (the
    row's gradient is 0), where fastalign_gspo gave the whole row a NaN gradient."""
    lp = torch.tensor([[-0.5, -1.0, -0.3], [-0.7, float("nan"), -0.2]])
    old = torch.tensor([[-0.6, -0.9, -0.4], [-0.8, -1.1, -0.3]])
    A = torch.tensor([[1.0] * 3, [-0.5] * 3])
    m = torch.ones(2, 3, dtype=torch.bool)
    actor = _actor("gspo", loss_agg_mode="seq-mean-token-mean")
    _set_global(actor, False, m)
    grads = []
    for name in ("gspo", "fastalign_gspo"):
        x = lp.clone().requires_grad_(True)
        loss, _ = core_algos.get_policy_loss_fn(name)(old_log_prob=old, log_prob=x, advantages=A, response_mask=m,
                                                       loss_agg_mode="seq-mean-token-mean", config=actor)
        loss.backward()
        grads.append(x.grad)
    assert torch.equal(grads[0][1], torch.zeros(3))
    torch.testing.assert_close(grads[1], grads[0], equal_nan=True)


# ---------------------------------------------------------------------------------------------
# verl's defaults and edge values through the registry


@pytest.mark.parametrize("mode", MODES)
def test_default_loss_agg_mode_is_verls(mode):
    """``fastalign_<mode>`` defaults ``loss_agg_mode`` as verl's own function for the mode does (gspo, sapo:
    seq-mean-token-mean), so a call that leaves it out gives verl's loss."""
    import inspect

    verl_fn, fa_fn = core_algos.get_policy_loss_fn(mode), core_algos.get_policy_loss_fn(plugin.PREFIX + mode)
    default = inspect.signature(verl_fn).parameters["loss_agg_mode"].default
    assert inspect.signature(fa_fn).parameters["loss_agg_mode"].default == default
    opts, pl = POLICY_CASES[mode]
    lp, old, A, m, _ = _policy_batch(60 + MODES.index(mode))
    actor = _actor(plugin.PREFIX + mode, pl, **opts)
    _set_global(actor, False, m)
    (vl, vm), (fl, fm) = (fn(old_log_prob=old, log_prob=lp, advantages=A, response_mask=m, config=actor)
                          for fn in (verl_fn, fa_fn))
    assert_close(fl, vl, atol=1e-6, rtol=1e-5, what=f"{mode} loss with the default loss_agg_mode")
    for k, v in vm.items():
        assert_close(torch.tensor(fm[k]), torch.tensor(v), atol=1e-6, rtol=1e-5, what=f"{mode} metric {k}")


NAN_RATIO_CASES = {  # mode -> policy_loss options (clip_cov: every candidate picked, or at most k)
    **{m: {} for m in sorted(POLICY_CASES) if m not in ("clip_cov", "dro")},
    "dro": dict(dro_beta=0.5),
    "clip_cov": dict(clip_cov_ratio=1.0, clip_cov_lb=-100.0, clip_cov_ub=100.0),
}
# verl counts a NaN log-ratio as clipped (cispo: ratio != clamp(ratio); geo_mean: ne(l, clamp(l))) or as a
# Clip-Cov candidate; fastalign counts it nowhere (docs/parity-policy.md "Not covered")
NAN_CLIPFRAC_DIFFERS = ("cispo", "geo_mean", "clip_cov")


@pytest.mark.parametrize("where", ["old_log_prob", "log_prob"])
@pytest.mark.parametrize("case", sorted(NAN_RATIO_CASES))
def test_nan_log_ratio_metrics_equal_verl(case, where):
    """A NaN log-ratio on valid tokens: the loss (NaN in most modes) and the metrics are verl's, but for the clip
    fractions of NAN_CLIPFRAC_DIFFERS."""
    mode = case
    lp = torch.tensor([[-0.5, -1.0, -0.2, -0.7, -0.4], [-0.3, -0.9, -1.2, -0.4, -2.0]])
    old = lp + torch.tensor([[0.05, -0.1, 0.02, 0.1, -0.03], [0.04, 0.01, -0.06, 0.08, -0.02]])
    A = torch.tensor([[1.0], [-0.5]]).expand(2, 5).contiguous()
    m = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    bad = old if where == "old_log_prob" else lp
    bad[0, 1] = bad[1, 2] = float("nan")  # one token with A > 0, one with A < 0
    actor = _actor(plugin.PREFIX + mode, NAN_RATIO_CASES[case])
    _set_global(actor, False, m)
    out = [core_algos.get_policy_loss_fn(name)(old, lp, A, m, "token-mean", actor, None)
           for name in (mode, plugin.PREFIX + mode)]
    (vl, vm), (fl, fm) = out
    torch.testing.assert_close(fl, vl, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert set(fm) == set(vm)
    for k, v in vm.items():
        if mode in NAN_CLIPFRAC_DIFFERS and k.startswith("actor/pg_clipfrac"):
            continue
        assert_close(torch.tensor(fm[k]), torch.tensor(v), atol=1e-6, rtol=1e-5, what=f"{case} metric {k}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("est", sorted(["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg",
                                        "grpo_passk", "reinforce_plus_plus_baseline", "gdpo"]))
def test_registry_estimator_with_a_non_finite_score_equals_verl(est, bad):
    """A NaN (a failed reward function) or ±inf sequence score through the registry, with the keywords of verl's
    trainer: ``fastalign_<est>`` gives verl's NaN groups (or NaN batch) and verl's numbers elsewhere."""
    r = torch.zeros(7, 2)
    r[:, -1] = torch.tensor([1.0, 0.0, bad, 1.0, 0.5, 0.0, bad])
    m = torch.ones(7, 2)
    m[5, 1] = 0
    uid = np.array(["a", "a", "a", "b", "b", "b", "c" if est != "grpo_passk" else "b"], dtype=object)
    cfg = AlgoConfig(adv_estimator=plugin.PREFIX + est)
    kw = dict(response_mask=m, index=uid, config=cfg)
    v_adv, v_ret = core_algos.get_adv_estimator_fn(est)(token_level_rewards=r.clone(), **kw)
    f_adv, f_ret = core_algos.get_adv_estimator_fn(plugin.PREFIX + est)(token_level_rewards=r.clone(), **kw)
    torch.testing.assert_close(f_adv, v_adv, atol=2e-6, rtol=2e-6, equal_nan=True)
    torch.testing.assert_close(f_ret, v_ret, atol=2e-6, rtol=2e-6, equal_nan=True)


@pytest.mark.parametrize("mode", sorted(POLICY_CASES))
def test_registry_policy_loss_takes_float64_as_verl(mode):
    """verl's loss modes take float64 log-probs and return a float64 loss; ``fastalign_<mode>`` raised a TypeError.
    It computes in float32 and returns verl's dtype: loss, d(loss)/d(log_prob) and the metrics equal verl's."""
    opts, pl = POLICY_CASES[mode]
    lp, old, A, m, w = (t.double() for t in _policy_batch(100 + sorted(POLICY_CASES).index(mode)))
    if mode == "kl_cov":
        v = m.bool()
        cov = (A[v] - A[v].mean()) * (lp[v] - lp[v].mean())
        assert torch.unique(cov).numel() == cov.numel(), "tied covariances in the kl_cov data"
    out = []
    for name in (mode, plugin.PREFIX + mode):
        actor = _actor(plugin.PREFIX + mode, pl, **opts)
        _set_global(actor, False, m)
        out.append(_dispatch(name, actor, lp, old, A, m, w, "token-mean"))
    (vl, vg, vm), (fl, fg, fm) = out
    assert fl.dtype == vl.dtype == torch.float64 and fg.dtype == vg.dtype == torch.float64
    assert_close(fl, vl, atol=1e-6, rtol=1e-5, what=f"{mode} loss")
    assert_close(fg, vg, atol=1e-6, rtol=1e-5, what=f"{mode} d log_prob")
    assert set(fm) == set(vm), (sorted(fm), sorted(vm))
    for k, v in vm.items():
        assert_close(torch.tensor(fm[k]), torch.tensor(v), atol=1e-6, rtol=1e-5, what=f"{mode} metric {k}")


# ---------------------------------------------------------------------------------------------
# shapes of advantages / rollout_is_weights through the registry


@pytest.mark.parametrize("arg", ["advantages", "rollout_is_weights"])
@pytest.mark.parametrize("mode", sorted(POLICY_CASES))
def test_registry_policy_loss_refuses_1d_values(mode, arg):
    """verl's modes broadcast a 1-D ``[B]`` advantages / rollout_is_weights along the last dim (the positions): at
    ``B == T`` verl's loss is that of the tensor repeated down the rows (not one value per sequence), at ``B != T`` it
    raises. ``fastalign_<mode>`` read ``[B]`` as one value per sequence, a loss verl does not compute; it refuses it,
    naming the argument."""
    opts, pl = POLICY_CASES[mode]
    for B, T in ((6, 6), (5, 7)):
        lp, old, A, m, w = _policy_batch(140 + sorted(POLICY_CASES).index(mode), B=B, T=T)
        kw = dict(old_log_prob=old, log_prob=lp, advantages=A, response_mask=m, loss_agg_mode="token-mean",
                  rollout_is_weights=w)
        one_d = kw[arg][:, 0].contiguous()
        actor = _actor(plugin.PREFIX + mode, pl, **opts)
        _set_global(actor, False, m)
        if B == T:
            try:
                torch.manual_seed(0)
                verl_1d = core_algos.get_policy_loss_fn(mode)(**{**kw, arg: one_d}, config=actor)[0]
            except IndexError:  # kl_cov: advantages[response_mask]
                verl_1d = None
            if verl_1d is not None:
                torch.manual_seed(0)
                along_t = core_algos.get_policy_loss_fn(mode)(**{**kw, arg: one_d[None, :].expand(B, T)},
                                                              config=actor)[0]
                assert_close(verl_1d, along_t, atol=1e-6, rtol=1e-6, what=f"{mode}: verl's [B] {arg}")
        else:
            with pytest.raises((RuntimeError, IndexError)):
                core_algos.get_policy_loss_fn(mode)(**{**kw, arg: one_d}, config=actor)
        with pytest.raises(ValueError, match=rf"^{arg} must have shape \[B, T\] \(or \[B, 1\].*got the 1-D shape"):
            core_algos.get_policy_loss_fn(plugin.PREFIX + mode)(**{**kw, arg: one_d}, config=actor)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "is_weights_b1"])
@pytest.mark.parametrize("mode", sorted(POLICY_CASES))
def test_registry_policy_loss_takes_per_sequence_advantages_as_verl(mode, weighted):
    """``[B, 1]`` advantages (and ``[B, 1]`` rollout_is_weights): verl broadcasts them along ``T``; ``fastalign_<mode>``
    raised ``ValueError``. Loss, d(loss)/d(log_prob) and metrics equal verl's. kl_cov and clip_cov: verl raises
    (``advantages[response_mask]``; ``ones_like(advantages)[picked] = 0``), and so does ``fastalign_<mode>``, a
    ``ValueError`` naming advantages."""
    opts, pl = POLICY_CASES[mode]
    lp, old, A, m, w = _policy_batch(160 + sorted(POLICY_CASES).index(mode))
    A1 = A[:, :1].contiguous()  # the batch's advantages are one per sequence
    w1 = w[:, :1].contiguous() if weighted else None
    if mode in ("kl_cov", "clip_cov"):  # verl raises on [B, 1] advantages
        actor = _actor(plugin.PREFIX + mode, pl, **opts)
        _set_global(actor, False, m)
        with pytest.raises(IndexError):
            _dispatch(mode, actor, lp, old, A1, m, w1, "token-mean")
        with pytest.raises(ValueError, match=rf"^advantages must have shape \[B, T\] in loss mode 'fastalign_{mode}'"):
            _dispatch(plugin.PREFIX + mode, actor, lp, old, A1, m, w1, "token-mean")
        return
    for agg in AGG:
        _check_against_verl(mode, lambda: _actor(plugin.PREFIX + mode, pl, loss_agg_mode=agg, **opts), False,
                            (lp, old, A1, m, w1), agg, what=f"{mode} {agg}")


# ---------------------------------------------------------------------------------------------
# uids grouped as each verl estimator groups them

#: uid arrays whose grouping differs between verl's estimators: a dict keyed by the raw uid (grpo, rloo, opo, gpg,
#: reinforce_plus_plus_baseline, grpo_passk, gdpo, the optimal-token-baseline ones), ``as_torch_index``
#: (grpo_vectorized: numeric strings by value, floats rounded or truncated to int64) and ``np.unique``
#: (rloo_vectorized)
UID_CASES = {
    "numeric-strings": np.array(["1", "01", "1", "01", "1", "01"], dtype=object),
    "numeric-str-array": np.array(["1", "01", "1", "01", "1", "01"]),
    "numeric-and-alpha": np.array(["1", "a", "01", "a", "1", "b"], dtype=object),
    "padded-numeric": np.array([" 1", "1", "2", "02", "1 ", "2"], dtype=object),
    "float-integral": np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]),
    "float-fractional": np.array([0.5, 0.7, 0.5, 1.2, 0.7, 1.2]),
    "float32": np.array([3.0, 3.0, 4.0, 4.0, 3.0, 4.0], dtype=np.float32),
    "int-and-float": np.array([1, 1.0, 2, 2.0, 1, 2], dtype=object),
    "int-and-str": np.array([1, "1", 1, "1", 2, "2"], dtype=object),
    "list-int-and-str": [1, "1", 1, "1", 2, "2"],
    "bool-and-int": np.array([True, 1, False, 0, True, 0], dtype=object),
    "bool-array": np.array([True, True, False, False, True, False]),
}
GROUPED_ESTIMATORS = ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg",
                      "reinforce_plus_plus_baseline", "grpo_passk", "gdpo", "optimal_token_baseline",
                      "tir_optimal_token_baseline"]


def _uid_batch():
    B, T = 6, 3
    g = torch.Generator().manual_seed(11)
    mask = torch.ones(B, T, dtype=D)
    mask[1, 2] = 0
    mask[4, 1:] = 0
    r = torch.zeros(B, T, dtype=D)
    r[torch.arange(B), mask.sum(-1).long() - 1] = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.3], dtype=D)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3.0
    p2 = torch.exp(old) ** 2 + torch.rand(B, T, generator=g, dtype=D) * 0.3
    return r, mask, old, p2


def _verl_and_fastalign(est, uid, **extra):
    r, mask, old, p2 = _uid_batch()
    kw = dict(response_mask=mask, index=uid, config=AlgoConfig(adv_estimator=est), **extra)
    if est.endswith("optimal_token_baseline"):
        kw.update(old_log_probs=old, sum_pi_squared=p2)
    out = []
    for name in (est, plugin.PREFIX + est):
        try:
            out.append(core_algos.get_adv_estimator_fn(name)(token_level_rewards=r.clone(), **kw))
        except Exception as e:  # verl's dict-keyed estimators raise KeyError on some float tensors
            out.append(e)
    return out


@pytest.mark.parametrize("uid", list(UID_CASES))
@pytest.mark.parametrize("est", GROUPED_ESTIMATORS)
def test_registry_estimator_groups_uids_as_verl(est, uid):
    """Each ``fastalign_<est>`` groups the uids as verl's function ``<est>`` does: ``"1"`` and ``"01"`` are one group in
    verl's grpo_vectorized (``as_torch_index``) and two elsewhere; float uids (``TypeError`` in fastalign) group by
    value, or as ``as_torch_index`` rounds / truncates them. Where verl raises (``np.unique`` over labels it cannot
    sort, pass@k groups of one), so does fastalign."""
    v, f = _verl_and_fastalign(est, UID_CASES[uid])
    if isinstance(v, Exception):
        assert type(f) is type(v) and str(f).startswith("index"), (v, f)  # the error names verl's argument
        return
    assert not isinstance(f, Exception), f
    for a, b, what in ((f[0], v[0], "advantages"), (f[1], v[1], "returns")):
        torch.testing.assert_close(a.to(D), b.to(D), atol=2e-6, rtol=2e-6, msg=lambda m: f"{est} {uid} {what}: {m}")


def test_numeric_string_uids_group_apart_or_together_as_verl():
    """The cases above bind: verl's grpo and grpo_vectorized give different advantages for uids "1" / "01"."""
    (vg, _), _ = _verl_and_fastalign("grpo", UID_CASES["numeric-strings"])
    (vv, _), (fv, _) = _verl_and_fastalign("grpo_vectorized", UID_CASES["numeric-strings"])
    assert not torch.allclose(vg, vv)
    torch.testing.assert_close(fv.to(D), vv.to(D), atol=2e-6, rtol=2e-6)
    for flag in (True, False):  # the flag given as verl's argument: Dr. GRPO, grouped as grpo_vectorized
        r, mask, _, _ = _uid_batch()
        kw = dict(response_mask=mask, index=UID_CASES["numeric-strings"], norm_adv_by_std_in_grpo=flag)
        v = core_algos.get_adv_estimator_fn("grpo_vectorized")(token_level_rewards=r.clone(), **kw)[0]
        f = core_algos.get_adv_estimator_fn("fastalign_grpo_vectorized")(token_level_rewards=r.clone(), **kw)[0]
        torch.testing.assert_close(f.to(D), v.to(D), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("est", GROUPED_ESTIMATORS)
def test_registry_estimator_float_tensor_and_non_finite_uids(est):
    """A float tensor of uids: grpo_vectorized and rloo_vectorized read it on the host as verl does (same
    advantages); verl's dict-keyed estimators hash each 0-d tensor by identity, so fastalign refuses it
    (``TypeError`` naming index). A NaN uid names no group: ``ValueError`` naming index."""
    uid = torch.tensor([0.5, 0.7, 0.5, 1.2, 0.7, 1.2])
    if est in ("grpo_vectorized", "rloo_vectorized"):
        (v, _), (f, _) = _verl_and_fastalign(est, uid)
        torch.testing.assert_close(f.to(D), v.to(D), atol=2e-6, rtol=2e-6)
    else:
        _, f = _verl_and_fastalign(est, uid)
        assert isinstance(f, TypeError) and "index" in str(f), f
    for bad in (np.array([0.0, 0.0, np.nan, 1.0, 1.0, 1.0]), [0.0, 0.0, float("inf"), 1.0, 1.0, 1.0]):
        _, f = _verl_and_fastalign(est, bad)
        assert isinstance(f, ValueError) and str(f).startswith("index holds a NaN or infinite uid"), f


# ---------------------------------------------------------------------------------------------
# optimal token baseline: handle_zero_tail


@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("est", ["optimal_token_baseline", "tir_optimal_token_baseline"])
def test_registry_optimal_token_baseline_handle_zero_tail_equals_verl(est, zero_tail):
    """verl's ``handle_zero_tail``: True sets the baseline of a group's strictly longest response to 0 past the
    second-longest length, False keeps the group's baseline there. ``fastalign_<est>`` refused False; both values
    equal verl's (advantages and returns), and the two values give different advantages on this batch."""
    d = _adv_batch(seed=21)
    mask = d["mask"].clone()
    mask[0] = 1  # the strictly longest response of group p0
    mask[[2, 5, 9], 4:] = 0
    mask[7, 2:4] = 0  # a masked span inside a response (multi-turn)
    kw = dict(response_mask=mask, index=d["uid"], old_log_probs=d["old"], sum_pi_squared=d["p2"],
              rollout_is_weights=d["iw"], handle_zero_tail=zero_tail)
    r = d["token_r"] * mask
    v_adv, v_ret = core_algos.get_adv_estimator_fn(est)(token_level_rewards=r.clone(), **kw)
    f_adv, f_ret = core_algos.get_adv_estimator_fn(plugin.PREFIX + est)(token_level_rewards=r.clone(), **kw)
    assert_close(f_adv, v_adv, atol=1e-6, rtol=1e-6, what=f"{est} advantages")
    assert_close(f_ret, v_ret, atol=1e-6, rtol=1e-6, what=f"{est} returns")
    other = core_algos.get_adv_estimator_fn(est)(token_level_rewards=r.clone(), **{**kw,
                                                                                    "handle_zero_tail": not zero_tail})
    assert not torch.allclose(other[0], v_adv), "handle_zero_tail does not bind on this batch"
