"""The keys of verl 0.9.1's configs: a config given as a dict (or omegaconf ``DictConfig``) holds only these.

verl's dataclasses refuse an unknown field (``TypeError``); the profile refuses an unknown key of a dict
config with ``ValueError`` rather than let a misspelt key (``entropy_coef``, ``clip_ratio_lo``) fall back to
verl's default. A key verl accepts and the profile does not read is accepted. The tables are verl 0.9.1's
field names (``tests/test_verl_config_keys.py`` compares them with its dataclasses).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, NamedTuple


class Keys(NamedTuple):
    """The keys of one verl config: ``owner`` (its dataclass, for the message), ``fields`` (its key names),
    ``nested`` (key → :class:`Keys` of the mapping it holds, checked in turn)."""
    owner: str
    fields: frozenset
    nested: Mapping[str, "Keys"] = {}


#: the keywords verl's ``agg_loss`` takes from ``**config.global_batch_info`` (another key: its ``TypeError``)
GLOBAL_BATCH_INFO = Keys("global_batch_info (agg_loss's keywords)",
                         frozenset({"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"}))
ROLLOUT_CORRECTION = Keys("RolloutCorrectionConfig", frozenset({
    "_target_", "rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize", "rollout_rs",
    "rollout_rs_threshold", "bypass_mode", "loss_type"}))
POLICY_LOSS = Keys("PolicyLossConfig", frozenset({
    "_target_", "loss_mode", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef",
    "dro_beta", "rollout_correction"}), {"rollout_correction": ROLLOUT_CORRECTION})
#: ``ActorConfig`` and the fields its FSDP, Megatron, VeOmni and TorchTitan subclasses add (``actor.yaml``)
ACTOR = Keys("ActorConfig (FSDP, Megatron, VeOmni or TorchTitan)", frozenset({
    "_target_", "strategy", "ppo_mini_batch_size", "ppo_micro_batch_size", "ppo_micro_batch_size_per_gpu",
    "ppo_infer_micro_batch_size_per_gpu", "use_dynamic_bsz", "ppo_max_token_len_per_gpu",
    "ppo_infer_max_token_len_per_gpu", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "freeze_vision_tower",
    "policy_loss", "clip_ratio_c", "loss_agg_mode", "loss_scale_factor", "entropy_coeff", "tau_pos", "tau_neg",
    "calculate_entropy", "calculate_sum_pi_squared", "use_kl_loss", "use_prefix_grouper", "use_torch_compile",
    "kl_loss_coef", "kl_loss_type", "ppo_epochs", "shuffle", "data_loader_seed", "checkpoint", "optim",
    "use_fused_kernels", "profiler", "engine", "rollout_n", "model_config", "global_batch_info", "qat",
    # the subclasses' own fields
    "entropy_from_logits_with_chunking", "entropy_from_logits_chunk_size", "megatron", "profile",
    "use_rollout_log_probs", "grad_clip", "ulysses_sequence_parallel_size", "entropy_checkpointing",
    "pad_to_length", "fsdp_config", "use_remove_padding", "veomni", "torchtitan"}),
    {"policy_loss": POLICY_LOSS, "global_batch_info": GLOBAL_BATCH_INFO})
KL_CTRL = Keys("KLControlConfig", frozenset({"_target_", "type", "kl_coef", "horizon", "target_kl"}))
FILTER_GROUPS = Keys("FilterGroupsConfig", frozenset({
    "_target_", "enable", "metric", "max_num_gen_batches", "max_inflight_gen_batches"}))
#: what verl's trainer reads from ``algorithm.pf_ppo`` (``compute_pf_ppo_reweight_data``'s keywords)
PF_PPO = Keys("pf_ppo (compute_pf_ppo_reweight_data's keywords)", frozenset({"reweight_method", "weight_pow"}))
ALGO = Keys("AlgoConfig", frozenset({
    "_target_", "gamma", "lam", "adv_estimator", "norm_adv_by_std_in_grpo", "use_kl_in_reward", "kl_penalty",
    "kl_ctrl", "use_pf_ppo", "pf_ppo", "filter_groups", "rollout_correction", "gdpo_reward_keys",
    "gdpo_reward_weights"}),
    {"kl_ctrl": KL_CTRL, "pf_ppo": PF_PPO, "filter_groups": FILTER_GROUPS, "rollout_correction": ROLLOUT_CORRECTION})


def check_keys(config: Any, keys: Keys, path: str) -> None:
    """``ValueError`` naming (as ``path.key``) each key of the mapping ``config`` that is not in ``keys.fields``,
    with the closest field name when one is close; the mappings ``keys.nested`` names are checked in turn.
    Anything but a mapping, and verl's dataclasses (mappings too: their own fields), are not checked."""
    if not isinstance(config, Mapping) or dataclasses.is_dataclass(config):
        return
    unknown = [k for k in config if k not in keys.fields]
    if unknown:
        def named(key) -> str:
            close = difflib.get_close_matches(str(key), sorted(keys.fields), n=1)
            return f"{path}.{key}" + (f" (did you mean {path}.{close[0]}?)" if close else "")
        raise ValueError(f"{', '.join(map(named, unknown))}: not a key of verl 0.9.1's {keys.owner}")
    for key, sub in keys.nested.items():
        check_keys(config.get(key), sub, f"{path}.{key}")
