"""verl 0.9.1 plugin: fastalign's policy losses and advantage estimators in verl's registries.

verl imports every ``verl.plugins`` entry point at ``import verl``; fastalign's points at this
module, so after ``pip install fastalign`` a verl run selects them by config alone::

    actor_rollout_ref.actor.policy_loss.loss_mode=fastalign_vanilla
    algorithm.adv_estimator=fastalign_grpo

Each verl loss mode ``m`` that :mod:`fastalign.integrations.verl.policy` covers is registered as
``fastalign_m`` with the signature of verl's policy-loss functions,
``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
-> (pg_loss, pg_metrics)``: the policy term only, aggregated with ``config.global_batch_info``
(verl's actor adds the entropy and KL terms itself). ``pg_metrics`` has the keys verl's own mode
returns; the values are detached 0-dim tensors rather than Python floats, so the loss makes no
host synchronisation (verl's ``Metric`` reads scalar tensors).

Each estimator ``e`` of :mod:`fastalign.integrations.verl.advantages` is registered as
``fastalign_e`` with the keyword arguments verl's estimator ``e`` takes, returning
``(advantages, returns)``. ``norm_adv_by_std_in_grpo`` is read from the argument or, when that is
not given, from ``config`` (verl's trainer passes only ``config`` to registered estimators).
verl 0.9.1's trainer hands some inputs only to its own estimator names: ``values`` (``gae``, on
a branch of its own), ``old_log_probs`` / ``sum_pi_squared`` (the optimal-token-baseline pair),
the reward components of ``gdpo_reward_keys`` (``gdpo``) and ``reward_baselines`` (computed for
``remax`` only). Under ``fastalign_<name>`` those estimators are for direct calls; called without
the input they raise ``ValueError`` rather than compute something else.

It also enables ``actor_rollout_ref.model.fused_kernel_options.impl_backend=fastalign``
(:mod:`fastalign.integrations.verl.fused`). :func:`register` is idempotent; importing this module
calls it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from fastalign.integrations.verl.advantages import ESTIMATORS, algo_options, compute_advantage
from fastalign.integrations.verl.policy import _MODES, VerlPolicyLoss, _get

__all__ = ["PREFIX", "POLICY_LOSSES", "ADVANTAGE_ESTIMATORS", "register"]

PREFIX = "fastalign_"


def _policy_loss_fn(mode: str) -> Callable:
    def policy_loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                       loss_agg_mode: str = "token-mean", config: Any = None,
                       rollout_is_weights: Optional[Tensor] = None) -> tuple[Tensor, Dict[str, Tensor]]:
        if config is None:
            raise ValueError(f"config (the actor config) is required by loss mode {PREFIX + mode!r}")
        info = _get(config, "global_batch_info", {}) or {}
        loss_fn = VerlPolicyLoss(config, loss_mode=mode, loss_agg_mode=loss_agg_mode, policy_term_only=True)
        loss, metrics = loss_fn(log_prob, old_log_prob, advantages, response_mask,
                                rollout_is_weights=rollout_is_weights, dp_size=int(info.get("dp_size") or 1),
                                batch_num_tokens=info.get("batch_num_tokens"),
                                global_batch_size=info.get("global_batch_size"))
        metrics.pop("actor/pg_loss")
        return loss, metrics

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"{PREFIX}{mode}_policy_loss"
    policy_loss_fn.__doc__ = (f"verl loss mode {mode!r} computed by fastalign (the policy term, metrics under "
                              "verl's names): see fastalign.integrations.verl.plugin.")
    return policy_loss_fn


def _algo(config: Any, estimator: str, norm_adv_by_std_in_grpo: Optional[bool]) -> Dict[str, Any]:
    """verl's ``AlgoConfig`` fields for ``estimator``; the std flag from the argument, else the config."""
    opts = {k: _get(config, k, v) for k, v in algo_options().items()}
    opts["adv_estimator"] = estimator
    if norm_adv_by_std_in_grpo is not None:
        opts["norm_adv_by_std_in_grpo"] = bool(norm_adv_by_std_in_grpo)
    return opts


def _gdpo_scores(config: Any, non_tensor_batch, like: Tensor) -> Optional[Tensor]:
    """gdpo's reward columns ``[B, K]`` from ``non_tensor_batch[k]`` for ``k`` in ``gdpo_reward_keys``."""
    keys = _get(config, "gdpo_reward_keys")
    if not keys:
        raise ValueError("gdpo needs algorithm.gdpo_reward_keys: the reward components returned by compute_score")
    missing = [k for k in keys if k not in non_tensor_batch]
    if missing:
        raise ValueError(f"gdpo_reward_keys {missing} are not in non_tensor_batch (keys: {list(non_tensor_batch)})")
    cols = [torch.as_tensor(non_tensor_batch[k], dtype=torch.float32).to(like.device) for k in keys]
    return torch.stack(cols, dim=-1)


#: estimators whose inputs verl 0.9.1's trainer passes only under its own names
_TRAINER_OWN_INPUTS = ("optimal_token_baseline", "tir_optimal_token_baseline")


def _advantage_fn(estimator: str) -> Callable:
    # grpo_vectorized is grpo computed at once; fastalign's grpo is vectorised already
    profile = "grpo" if estimator == "grpo_vectorized" else estimator

    def advantage_fn(token_level_rewards: Tensor, response_mask: Optional[Tensor] = None, index=None,
                     epsilon: Optional[float] = None, norm_adv_by_std_in_grpo: Optional[bool] = None,
                     config: Any = None, *, values: Optional[Tensor] = None,
                     reward_baselines: Optional[Tensor] = None, old_log_probs: Optional[Tensor] = None,
                     sum_pi_squared: Optional[Tensor] = None, rollout_is_weights: Optional[Tensor] = None,
                     non_tensor_batch=None, batch=None, gamma: Optional[float] = None,
                     lam: Optional[float] = None, f_norm: float = 1.0, alpha: float = 1.0,
                     handle_zero_tail: bool = True, **unused) -> tuple[Tensor, Tensor]:
        if response_mask is None:
            raise ValueError(f"{PREFIX + estimator}: response_mask is required")
        opts = _algo(config, profile, norm_adv_by_std_in_grpo)
        if gamma is not None:
            opts["gamma"] = float(gamma)
        if lam is not None:
            opts["lam"] = float(lam)
        if estimator == "gae" and values is None:
            raise ValueError(f"{PREFIX}gae needs values [B, T]; verl 0.9.1's trainer passes them only to its own 'gae' "
                             "(use algorithm.adv_estimator=gae there)")
        if estimator in _TRAINER_OWN_INPUTS and old_log_probs is None and sum_pi_squared is None:
            raise ValueError(f"{PREFIX + estimator} needs old_log_probs and sum_pi_squared [B, T]; verl 0.9.1's trainer "
                             f"passes them only to its own {estimator!r} (use algorithm.adv_estimator={estimator} there)")
        if estimator == "gdpo" and _get(config, "gdpo_reward_keys") and non_tensor_batch is None:
            raise ValueError(f"{PREFIX}gdpo: algorithm.gdpo_reward_keys is set but non_tensor_batch was not passed; "
                             "verl 0.9.1's trainer passes the reward components only to its own 'gdpo' (use "
                             "algorithm.adv_estimator=gdpo there)")
        if estimator == "gpg" and alpha != 1.0:
            raise ValueError(f"alpha does not apply to {PREFIX}gpg: it is B / count_nonzero(scores), as in verl")
        if estimator in ("optimal_token_baseline", "tir_optimal_token_baseline") and not handle_zero_tail:
            raise ValueError(f"handle_zero_tail=False is not supported by {PREFIX + estimator}")
        reward_scores = None
        if estimator == "gdpo":
            if config is not None and non_tensor_batch is not None and batch is not None:
                reward_scores = _gdpo_scores(config, non_tensor_batch, token_level_rewards)
            else:  # verl then normalises the summed reward alone and applies no weights
                opts["gdpo_reward_weights"] = None
        else:
            opts["gdpo_reward_weights"] = None
        adv, returns = compute_advantage(opts, token_level_rewards, response_mask, index, values=values,
                                         reward_baselines=reward_baselines, reward_scores=reward_scores,
                                         old_log_probs=old_log_probs, sum_pi_squared=sum_pi_squared,
                                         rollout_is_weights=rollout_is_weights, epsilon=epsilon)
        if estimator == "gpg" and f_norm != 1.0:
            adv = adv / f_norm
            returns = adv
        return adv, returns

    advantage_fn.__name__ = advantage_fn.__qualname__ = f"{PREFIX}{estimator}_advantage"
    advantage_fn.__doc__ = (f"verl advantage estimator {estimator!r} computed by fastalign, returning "
                            "(advantages, returns): see fastalign.integrations.verl.plugin.")
    return advantage_fn


#: ``fastalign_<mode>`` → its verl policy-loss function.
POLICY_LOSSES: Dict[str, Callable] = {PREFIX + m: _policy_loss_fn(m) for m in _MODES}
#: ``fastalign_<estimator>`` → its verl advantage-estimator function.
ADVANTAGE_ESTIMATORS: Dict[str, Callable] = {PREFIX + e: _advantage_fn(e) for e in ESTIMATORS}


def register() -> None:
    """Put :data:`POLICY_LOSSES` and :data:`ADVANTAGE_ESTIMATORS` into verl's registries and make
    ``fused_kernel_options.impl_backend=fastalign`` a fused-kernel backend (idempotent)."""
    from verl.trainer.ppo import core_algos

    from fastalign.integrations.verl import fused

    fused.enable()

    for name, fn in POLICY_LOSSES.items():
        core_algos.register_policy_loss(name)(fn)
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            core_algos.register_adv_est(name)(fn)


register()
