"""A verl config given as a dict (or DictConfig) holds only the keys of verl 0.9.1's dataclasses.

verl's ``ActorConfig`` / ``PolicyLossConfig`` / ``AlgoConfig`` refuse an unknown field (``TypeError``); the
profile refuses an unknown dict key with ``ValueError`` naming it (and the closest field) instead of reading
verl's default in its place. Every field verl's dataclasses have is accepted, and the key tables match them.
"""
import dataclasses
import glob
import importlib
import inspect
import os
from collections.abc import Mapping

import pytest
import torch

from fastalign.integrations.verl import VerlPolicyLoss, algo_options, compute_advantage, verl_policy_config
from fastalign.integrations.verl import _keys


def batch(B=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    A = torch.randn(B, T, generator=g)
    m = torch.arange(T)[None, :] < torch.tensor([[5], [3], [4], [2]])
    return lp, old, A, m, torch.rand(B, T, generator=g), lp - 0.3


def rewards():
    r = torch.zeros(4, 3)
    r[:, -1] = torch.tensor([1.0, 0.0, 2.0, 0.5])
    return r, torch.ones(4, 3), ["a", "a", "b", "b"]


# (dict config, the key the message names, the field it suggests)
ACTOR_TYPOS = [
    ({"clip_ratio_lo": 0.01}, "actor.clip_ratio_lo", "actor.clip_ratio_low"),
    ({"clip_ratio_hi": 0.01}, "actor.clip_ratio_hi", "actor.clip_ratio_high"),
    ({"loss_agg": "seq-mean-token-sum"}, "actor.loss_agg", "actor.loss_agg_mode"),
    ({"entropy_coef": 0.5}, "actor.entropy_coef", "actor.entropy_coeff"),  # TRL's spelling
    ({"use_kl": True, "kl_loss_coef": 1.0}, "actor.use_kl", "actor.use_kl_loss"),
    ({"policy_loss": {"loss_mod": "gspo"}}, "actor.policy_loss.loss_mod", "actor.policy_loss.loss_mode"),
    ({"policy_loss": {"loss_mode": "kl_cov", "kl_cov_ration": 0.1}}, "actor.policy_loss.kl_cov_ration",
     "actor.policy_loss.kl_cov_ratio"),
    ({"policy_loss": {"rollout_correction": {"rollout_is_treshold": 2.0}}},
     "actor.policy_loss.rollout_correction.rollout_is_treshold",
     "actor.policy_loss.rollout_correction.rollout_is_threshold"),
    ({"global_batch_info": {"batch_num_token": 10}}, "actor.global_batch_info.batch_num_token",
     "actor.global_batch_info.batch_num_tokens"),
]
ALGO_TYPOS = [
    ({"adv_estimator": "grpo", "norm_adv_by_std": False}, "algorithm.norm_adv_by_std",
     "algorithm.norm_adv_by_std_in_grpo"),
    ({"adv_estimator": "grpo", "gama": 0.9}, "algorithm.gama", "algorithm.gamma"),
    ({"adv_estimator": "grpo", "kl_ctrl": {"kl_coeff": 0.1}}, "algorithm.kl_ctrl.kl_coeff",
     "algorithm.kl_ctrl.kl_coef"),
    ({"adv_estimator": "grpo", "pf_ppo": {"weight_power": 2.0}}, "algorithm.pf_ppo.weight_power",
     "algorithm.pf_ppo.weight_pow"),
    ({"adv_estimator": "grpo", "filter_groups": {"enabled": True}}, "algorithm.filter_groups.enabled",
     "algorithm.filter_groups.enable"),
    ({"adv_estimator": "grpo", "rollout_correction": {"bypass": True}}, "algorithm.rollout_correction.bypass",
     "algorithm.rollout_correction.bypass_mode"),
]


def _message(key, hint):
    return f"{key} (did you mean {hint}?)"


@pytest.mark.parametrize("cfg,key,hint", ACTOR_TYPOS)
def test_actor_dict_with_unknown_key_raises_naming_it(cfg, key, hint):
    for build in (VerlPolicyLoss, verl_policy_config):
        with pytest.raises(ValueError) as err:
            build(cfg)
        assert _message(key, hint) in str(err.value)


@pytest.mark.parametrize("cfg,key,hint", ACTOR_TYPOS[:5])
def test_actor_dictconfig_with_unknown_key_raises(cfg, key, hint):
    omegaconf = pytest.importorskip("omegaconf")
    with pytest.raises(ValueError) as err:
        VerlPolicyLoss(omegaconf.OmegaConf.create(cfg))
    assert _message(key, hint) in str(err.value)


def test_unknown_key_without_a_close_field_is_named():
    with pytest.raises(ValueError, match=r"actor\.zzz: not a key of verl 0\.9\.1's ActorConfig"):
        VerlPolicyLoss({"zzz": 1})


def test_global_batch_info_key_added_after_construction_raises_at_the_call():
    """verl writes the counts into global_batch_info before each loss; its agg_loss takes only its keywords."""
    lp, old, A, m, H, ref = batch()
    actor = {"global_batch_info": {}}
    loss_fn = VerlPolicyLoss(actor)
    loss_fn(lp, old, A, m)
    actor["global_batch_info"]["global_batch_sise"] = 4
    with pytest.raises(ValueError) as err:
        loss_fn(lp, old, A, m)
    assert _message("actor.global_batch_info.global_batch_sise", "actor.global_batch_info.global_batch_size") \
        in str(err.value)


@pytest.mark.parametrize("cfg,key,hint", ALGO_TYPOS)
def test_algo_dict_with_unknown_key_raises_naming_it(cfg, key, hint):
    r, mm, index = rewards()
    for call in (lambda: compute_advantage(cfg, r, mm, index), lambda: algo_options(cfg)):
        with pytest.raises(ValueError) as err:
            call()
        assert _message(key, hint) in str(err.value)


def test_registered_estimators_called_with_a_dict_raise():
    """The registered fastalign_<estimator> functions read the config key by key: a misspelt key was dropped."""
    pytest.importorskip("verl.trainer.ppo.core_algos")
    from fastalign.integrations.verl import plugin

    r, mm, index = rewards()
    for fn in (plugin.ADVANTAGE_ESTIMATORS["fastalign_grpo"], plugin._grpo_batch_std_advantage):
        with pytest.raises(ValueError, match=r"algorithm\.norm_adv_by_std \(did you mean"):
            fn(token_level_rewards=r, response_mask=mm, index=index, config={"norm_adv_by_std": False})


def test_algo_dictconfig_with_unknown_key_raises():
    omegaconf = pytest.importorskip("omegaconf")
    r, mm, index = rewards()
    cfg = omegaconf.OmegaConf.create({"adv_estimator": "grpo", "norm_adv_by_std": False})
    with pytest.raises(ValueError, match=r"algorithm\.norm_adv_by_std \(did you mean"):
        compute_advantage(cfg, r, mm, index)


# ---- against verl 0.9.1's own dataclasses -----------------------------------------------------------------------

def _verl(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


actor_config, algorithm, core_algos = map(_verl, ("verl.workers.config.actor", "verl.trainer.config.algorithm",
                                                  "verl.trainer.ppo.core_algos"))
needs_verl = pytest.mark.skipif(None in (actor_config, algorithm, core_algos), reason="verl is not importable")
ACTOR_CLASSES = (actor_config.ActorConfig, *actor_config.ActorConfig.__subclasses__()) if actor_config else ()


def _fields(*classes):
    return {f.name for c in classes for f in dataclasses.fields(c)}


def _keywords(fn, *skip):
    return set(inspect.signature(fn).parameters) - set(skip)


@needs_verl
def test_key_tables_are_verls_fields():
    assert {c.__name__ for c in ACTOR_CLASSES} >= {"FSDPActorConfig", "McoreActorConfig"}
    assert _keys.ACTOR.fields == _fields(*ACTOR_CLASSES)
    assert _keys.POLICY_LOSS.fields == _fields(actor_config.PolicyLossConfig)
    assert _keys.ALGO.fields == _fields(algorithm.AlgoConfig)
    assert _keys.ROLLOUT_CORRECTION.fields == _fields(algorithm.RolloutCorrectionConfig)
    assert _keys.KL_CTRL.fields == _fields(algorithm.KLControlConfig)
    assert _keys.FILTER_GROUPS.fields == _fields(algorithm.FilterGroupsConfig)
    assert _keys.GLOBAL_BATCH_INFO.fields == _keywords(core_algos.agg_loss, "loss_mat", "loss_mask", "loss_agg_mode")
    assert _keys.PF_PPO.fields == _keywords(core_algos.compute_pf_ppo_reweight_data, "data")


@needs_verl
@pytest.mark.parametrize("cfg,key,hint", ACTOR_TYPOS[:5])
def test_verls_actor_config_refuses_the_same_keys(cfg, key, hint):
    with pytest.raises(TypeError):
        actor_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **cfg)


@needs_verl
def test_verls_algo_config_refuses_the_same_key():
    with pytest.raises(TypeError):
        algorithm.AlgoConfig(adv_estimator="grpo", norm_adv_by_std=False)


@needs_verl
@pytest.mark.parametrize("cls", ACTOR_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_every_actor_field_is_accepted(cls, loss_mode):
    """The dict of every field of a default verl actor config (nested configs as dicts) gives the loss the
    dataclass gives."""
    kw = dict(rollout_n=1, ppo_micro_batch_size_per_gpu=1, use_kl_loss=True, entropy_coeff=0.01,
              policy_loss=actor_config.PolicyLossConfig(loss_mode=loss_mode))
    if cls is actor_config.ActorConfig:
        kw["strategy"] = "fsdp"
    actor = cls(**kw)
    as_dict = dataclasses.asdict(actor)
    assert set(as_dict) == _fields(cls) and set(as_dict["policy_loss"]) == _keys.POLICY_LOSS.fields
    assert isinstance(as_dict["policy_loss"]["rollout_correction"], dict)
    lp, old, A, m, H, ref = batch()
    got, _ = VerlPolicyLoss(as_dict)(lp, old, A, m, entropy=H, ref_log_prob=ref)
    want, _ = VerlPolicyLoss(actor)(lp, old, A, m, entropy=H, ref_log_prob=ref)
    assert torch.equal(got, want)
    assert verl_policy_config(as_dict) == verl_policy_config(actor)


@needs_verl
def test_every_global_batch_info_key_is_accepted():
    lp, old, A, m, H, ref = batch()
    info = dict(dp_size=1, batch_num_tokens=int(m.sum()), global_batch_size=4, loss_scale_factor=None)
    assert set(info) == _keys.GLOBAL_BATCH_INFO.fields
    got, _ = VerlPolicyLoss({"global_batch_info": info})(lp, old, A, m)
    want, _ = VerlPolicyLoss({})(lp, old, A, m, batch_num_tokens=int(m.sum()))
    assert torch.equal(got, want)


@needs_verl
def test_verl_config_objects_are_not_checked():
    """verl's dataclasses are mappings of their own fields: a config of another class (the distillation loss's,
    which verl hands to its loss modes) is taken as it is."""
    from verl.workers.config.distillation import DistillationLossConfig

    config = DistillationLossConfig()
    assert isinstance(config, Mapping) and not set(config) <= _keys.ACTOR.fields
    lp, old, A, m, H, ref = batch()
    VerlPolicyLoss(config, loss_mode="vanilla", loss_agg_mode="token-mean", policy_term_only=True)(lp, old, A, m)


@needs_verl
@pytest.mark.parametrize("norm", [True, False])
def test_every_algo_field_is_accepted(norm):
    cfg = algorithm.AlgoConfig(adv_estimator="grpo", norm_adv_by_std_in_grpo=norm,
                               filter_groups=algorithm.FilterGroupsConfig(),
                               rollout_correction=algorithm.RolloutCorrectionConfig(),
                               pf_ppo=dict(reweight_method="pow", weight_pow=2.0))
    as_dict = dataclasses.asdict(cfg)
    assert set(as_dict) == _keys.ALGO.fields
    for key in ("kl_ctrl", "filter_groups", "rollout_correction", "pf_ppo"):
        assert isinstance(as_dict[key], dict) and as_dict[key]
    r, mm, index = rewards()
    got = compute_advantage(as_dict, r, mm, index)[0]
    assert torch.equal(got, compute_advantage(cfg, r, mm, index)[0])
    assert algo_options(as_dict) == algo_options(cfg)


VERL_YAML = sorted(glob.glob(os.path.join(os.path.dirname(algorithm.__file__), "_generated_ppo*_trainer.yaml"))
                   ) if algorithm else []


@needs_verl
@pytest.mark.parametrize("path", VERL_YAML, ids=os.path.basename)
def test_verls_trainer_yaml_configs_are_accepted(path):
    """verl's shipped trainer configs (FSDP, Megatron, VeOmni, TorchTitan): their actor and algorithm sections
    as DictConfigs."""
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.load(path)
    verl_policy_config(cfg.actor_rollout_ref.actor)
    assert algo_options(cfg.algorithm)["adv_estimator"] == cfg.algorithm.adv_estimator


@needs_verl
def test_verls_trainer_yaml_configs_are_found():
    assert len(VERL_YAML) >= 2


@needs_verl
@pytest.mark.parametrize("cfg,key,hint", ACTOR_TYPOS)
def test_registered_loss_called_with_a_dict_raises(cfg, key, hint):
    from fastalign.integrations.verl.plugin import POLICY_LOSSES

    lp, old, A, m, H, ref = batch()
    with pytest.raises(ValueError) as err:
        POLICY_LOSSES["fastalign_vanilla"](old, lp, A, m, config=cfg)
    assert _message(key, hint) in str(err.value)
