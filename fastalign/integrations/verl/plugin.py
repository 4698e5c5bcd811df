"""verl 0.9.1 plugin: fastalign's policy losses and advantage estimators in verl's registries.

verl imports every ``verl.plugins`` entry point at ``import verl``; fastalign's points at this
module, so after ``pip install fastalign`` a verl run selects them by config alone::

    actor_rollout_ref.actor.policy_loss.loss_mode=fastalign_vanilla
    algorithm.adv_estimator=fastalign_grpo
    distillation.distillation_loss.loss_mode=fastalign_forward_kl_topk

(the last: :mod:`fastalign.integrations.verl.distillation`, registered when verl imports its distillation losses).

Each verl loss mode ``m`` that :mod:`fastalign.integrations.verl.policy` covers is registered as
``fastalign_m`` with the signature of verl's policy-loss functions,
``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
-> (pg_loss, pg_metrics)``, with the default ``loss_agg_mode`` of verl's function for that mode (gspo
and sapo: ``"seq-mean-token-mean"``, the others ``"token-mean"``): the policy term only, aggregated
with ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size`` and
``loss_scale_factor``, read from there alone as verl's modes read them; verl's actor adds the entropy
and KL terms itself). ``pg_metrics`` has the keys and the types verl's own mode returns: a dict of
Python floats (verl's actor wraps them in ``Metric`` with mean aggregation). They are read from the device in
one transfer, where verl's modes read each.

``advantages`` and ``rollout_is_weights``: ``[B, T]``, or ``[B, 1]`` (one value per sequence, broadcast along
``T`` as verl's arithmetic broadcasts it). A 1-D ``[B]`` tensor raises ``ValueError`` naming the argument: verl's
modes broadcast it along the last dim, the response positions (a different loss when ``B == T``, a
``RuntimeError`` otherwise), where :class:`~fastalign.integrations.verl.VerlPolicyLoss` reads ``[B]`` as one value
per sequence; verl's trainer passes ``[B, T]``. ``fastalign_kl_cov`` and ``fastalign_clip_cov`` take ``[B, T]``
advantages only (``ValueError``): verl's kl_cov indexes them by the mask and raises on ``[B, 1]``, verl's clip_cov
zeroes its picked tokens in a tensor shaped like them, which raises, or zeroes whole rows, on ``[B, 1]``.

Known differences of the losses (docs/parity-policy.md "Not covered"): KL-Cov breaks ties in the
covariance at the top-k cut by the lower index, verl's ``torch.topk`` in an unspecified order, so with
tied covariances (one advantage per sequence and equal log-probs) the penalised tokens can differ;
Clip-Cov picks its tokens with a seeded device choice where verl calls ``torch.randperm``; a Clip-Cov
token picked with an infinite ratio gets a 0 gradient and stays out of the loss, where verl's loss is
NaN.

Each estimator ``e`` of :mod:`fastalign.integrations.verl.advantages` is registered as
``fastalign_e`` with the parameters of verl's estimator function ``e`` in verl's order (so a
positional call binds as verl's: ``fastalign_gae(rewards, values, mask, gamma, lam)``,
``fastalign_remax(rewards, baselines, mask)``, ``fastalign_gpg(rewards, mask, index, epsilon, f_norm)``),
followed by keyword-only parameters for what the other estimators take and ``**unused`` (ignored, as
verl's ``**kwargs``); ``gamma`` and ``lam`` apply to ``fastalign_gae`` only (elsewhere verl ignores them, so
they raise ``ValueError``). For verl's ``grpo`` and ``grpo_vectorized``, which have no ``**kwargs``,
the signature is exactly verl's: another keyword is a ``TypeError``, as verl's. Returning
``(advantages, returns)``, with verl's values for NaN scores (NaN groups, verl's gpg ``alpha``; see
:mod:`fastalign.integrations.verl.advantages`). ``norm_adv_by_std_in_grpo`` is read from the argument
or, when that is not given, from ``config`` (verl's trainer passes only ``config`` to registered estimators).
verl's ``grpo_vectorized`` and ``gdpo`` never read the flag from ``config`` (its trainer passes
the argument to its own ``grpo`` only), so ``fastalign_grpo_vectorized`` and ``fastalign_gdpo``
refuse a ``False`` there with :func:`~fastalign.integrations.verl.advantages.compute_advantage`'s
``ValueError`` rather than compute other numbers than verl's. Given as the argument, ``False`` makes
``fastalign_grpo_vectorized`` Dr. GRPO, as verl's function; ``fastalign_gdpo`` refuses it.

Grouping by ``index`` (the uids) follows verl's function for each estimator: grpo_vectorized maps them with verl's
``as_torch_index`` (numeric strings by value: ``"1"`` and ``"01"`` are one group; float uids rounded, or cast
to int64), rloo_vectorized with ``np.unique``, the others key a dict by the raw uid (``"1"`` and ``"01"`` two
groups; a float array by its values). A NaN or infinite float uid raises ``ValueError``; integer tensors group
by value (see :mod:`fastalign.integrations.verl.advantages`). ``handle_zero_tail`` (the optimal-token-baseline
estimators) is verl's switch, both values.

fastalign estimators verl has no name for are registered when they need only what verl's trainer
passes to a registered estimator (``token_level_rewards``, ``response_mask``, ``index``,
``config``): ``fastalign_grpo_batch_std``, ``A = (r - mean_group(r)) / (std_batch(r) + eps)`` (the
group mean, the unbiased standard deviation of every score in the batch; a group of one gets 0).

What verl 0.9.1's registry cannot express, because its trainer hands some inputs only to its own
estimator names (``ray_trainer.compute_advantage``) and to no registered one:

* ``gae``: ``values`` (on a branch of its own); ``remax``: ``reward_baselines`` (the greedy
  rollout is generated for ``adv_estimator=remax`` only); ``optimal_token_baseline`` /
  ``tir_optimal_token_baseline``: ``old_log_probs`` and ``sum_pi_squared``; ``gdpo``: the reward
  components of ``gdpo_reward_keys`` (without keys it normalises the summed reward).
  These are registered too, for direct calls (with verl's keywords, or positionally in verl's
  order); selected by ``algorithm.adv_estimator`` they raise ``ValueError`` on the missing input
  rather than compute something else. Use verl's own name for them.
* GiGPO step groups (``group_advantages(step_index=...)``): the environment-state ids are not
  passed; PRIME implicit process rewards (``implicit_process_advantages``): the policy and
  reference log-probs are not passed. Not registered.

Rollout-correction bypass mode (``algorithm.rollout_correction.bypass_mode=True``): verl 0.9.1
keeps no registry of loss modes for it; its trainer sets ``policy_loss.loss_mode="bypass_mode"``
(verl's own PPO-clip / REINFORCE on ``pi / pi_rollout``), replacing whatever mode was configured,
a ``fastalign_<mode>`` included. Decoupled rollout correction (``bypass_mode=False``) hands
``rollout_is_weights`` to the configured mode, which the ``fastalign_<mode>`` losses apply.

It also enables ``actor_rollout_ref.model.fused_kernel_options.impl_backend=fastalign``
(:mod:`fastalign.integrations.verl.fused`) and, with the environment variable ``FASTALIGN_VERL_MEGATRON=1``,
fastalign's logits processor in verl's Megatron engine (:mod:`fastalign.integrations.verl.megatron`).
:func:`register` is idempotent; importing this module
calls it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fastalign.advantages import group_advantages, token_advantages
from fastalign.integrations.verl._keys import ALGO, check_keys
from fastalign.integrations.verl._names import PREFIX
from fastalign.integrations.verl.advantages import ESTIMATORS, algo_options, compute_advantage, group_keys_on
from fastalign.integrations.verl.policy import _MODES, VerlPolicyLoss, _get

__all__ = ["PREFIX", "POLICY_LOSSES", "ADVANTAGE_ESTIMATORS", "register"]



def _verl_default_agg(mode: str) -> str:
    """The default ``loss_agg_mode`` of verl's own function for loss mode ``mode`` (gspo and sapo:
    ``"seq-mean-token-mean"``, the others ``"token-mean"``), read from its signature."""
    from verl.trainer.ppo import core_algos

    param = inspect.signature(core_algos.get_policy_loss_fn(mode)).parameters.get("loss_agg_mode")
    if param is None or param.default is inspect.Parameter.empty:
        raise TypeError(f"verl's loss mode {mode!r} has no default loss_agg_mode to take")
    return param.default


#: the loss modes whose verl function cannot take ``[B, 1]`` advantages, and why
_PER_TOKEN_ADVANTAGES = {
    "kl_cov": "verl's kl_cov selects advantages[response_mask], which raises on [B, 1]",
    "clip_cov": "verl's clip_cov zeroes its picked tokens in ones_like(advantages), which raises on [B, 1] when a "
                "token past the first position is picked (and zeroes whole rows when first positions are)",
}


def _check_per_token(mode: str, log_prob, advantages, rollout_is_weights) -> None:
    """``advantages`` and ``rollout_is_weights`` as verl's loss modes read them: ``[B, T]`` or ``[B, 1]`` (one value
    per sequence, broadcast along ``T``). verl broadcasts a 1-D ``[B]`` tensor along the last dim, the response
    positions, not the sequences: ``ValueError`` rather than a loss verl does not compute (verl itself raises
    when ``B != T`` and computes per position when ``B == T``). kl_cov and clip_cov: ``[B, T]`` advantages only
    (:data:`_PER_TOKEN_ADVANTAGES`)."""
    for name, t in (("advantages", advantages), ("rollout_is_weights", rollout_is_weights)):
        if isinstance(t, Tensor) and t.dim() == 1:
            raise ValueError(
                f"{name} must have shape [B, T] (or [B, 1], one value per sequence) in loss mode {PREFIX + mode!r}, "
                f"got the 1-D shape {tuple(t.shape)}: verl's loss modes broadcast a 1-D tensor along the response "
                f"positions (the last dim), not the sequences; pass {name}[:, None] for one value per sequence")
    if (mode in _PER_TOKEN_ADVANTAGES and isinstance(advantages, Tensor) and isinstance(log_prob, Tensor)
            and advantages.dim() == 2 and log_prob.dim() == 2 and advantages.shape[1] == 1 != log_prob.shape[1]):
        raise ValueError(f"advantages must have shape [B, T] in loss mode {PREFIX + mode!r}, got "
                         f"{tuple(advantages.shape)}: {_PER_TOKEN_ADVANTAGES[mode]}; pass "
                         "advantages.expand_as(log_prob)")


def _policy_loss_fn(mode: str) -> Callable:
    default_agg = _verl_default_agg(mode)

    def policy_loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                       loss_agg_mode: str = default_agg, config: Any = None,
                       rollout_is_weights: Optional[Tensor] = None) -> tuple[Tensor, Dict[str, Tensor]]:
        if config is None:
            raise ValueError(f"config (the actor config) is required by loss mode {PREFIX + mode!r}")
        _check_per_token(mode, log_prob, advantages, rollout_is_weights)
        # the counts and loss_scale_factor come from config.global_batch_info, as verl's modes read them
        loss_fn = VerlPolicyLoss(config, loss_mode=mode, loss_agg_mode=loss_agg_mode, policy_term_only=True)
        loss, metrics = loss_fn(log_prob, old_log_prob, advantages, response_mask,
                                rollout_is_weights=rollout_is_weights)
        metrics.pop("actor/pg_loss")
        names = list(metrics)  # Python floats, as verl's own modes return them: one host read for all
        values = torch.stack([metrics[k].float() for k in names]).tolist() if names else []
        return loss, dict(zip(names, values))

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"{PREFIX}{mode}_policy_loss"
    policy_loss_fn.__doc__ = (f"verl loss mode {mode!r} computed by fastalign (the policy term, metrics under "
                              "verl's names): see fastalign.integrations.verl.plugin.")
    return policy_loss_fn


def _algo(config: Any, estimator: str, norm_adv_by_std_in_grpo: Optional[bool]) -> Dict[str, Any]:
    """verl's ``AlgoConfig`` fields for ``estimator``; the std flag from the argument, else the config (a dict
    config's unknown key raises ``ValueError``)."""
    check_keys(config, ALGO, "algorithm")
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
    cols = []
    for k in keys:  # np.float32 as verl reads them: DataProto's dtype=object arrays, a None is NaN
        try:
            cols.append(torch.as_tensor(np.asarray(non_tensor_batch[k], dtype=np.float32)).to(like.device))
        except (TypeError, ValueError) as e:
            raise ValueError(f"gdpo_reward_keys: non_tensor_batch[{k!r}] is not an array of numbers ({e})") from None
    return torch.stack(cols, dim=-1)


#: estimators whose inputs verl 0.9.1's trainer passes only under its own names
_TRAINER_OWN_INPUTS = ("optimal_token_baseline", "tir_optimal_token_baseline")

_GROUPED_PARAMS = ("token_level_rewards", "response_mask", "index", "epsilon", "config")
_GRPO_PARAMS = ("token_level_rewards", "response_mask", "index", "epsilon", "norm_adv_by_std_in_grpo", "config")
_OTB_PARAMS = ("token_level_rewards", "response_mask", "index", "old_log_probs", "sum_pi_squared",
               "rollout_is_weights", "handle_zero_tail", "epsilon")
#: the named parameters of verl 0.9.1's estimator function ``e``, in its order: ``fastalign_e`` takes
#: them in that order (positional or keyword), the rest of :data:`_ADVANTAGE_DEFAULTS` keyword-only.
_VERL_PARAMETERS: Dict[str, Tuple[str, ...]] = {
    **dict.fromkeys(("grpo", "grpo_vectorized", "grpo_passk"), _GRPO_PARAMS),
    "gdpo": _GRPO_PARAMS + ("non_tensor_batch", "batch"),
    **dict.fromkeys(("rloo", "rloo_vectorized", "opo", "reinforce_plus_plus_baseline"), _GROUPED_PARAMS),
    "gpg": ("token_level_rewards", "response_mask", "index", "epsilon", "f_norm", "alpha", "config"),
    "gae": ("token_level_rewards", "values", "response_mask", "gamma", "lam"),
    "reinforce_plus_plus": ("token_level_rewards", "response_mask", "config"),
    "remax": ("token_level_rewards", "reward_baselines", "response_mask", "config"),
    **dict.fromkeys(_TRAINER_OWN_INPUTS, _OTB_PARAMS),
}
#: every input a ``fastalign_<estimator>`` reads besides ``token_level_rewards``, with its default
#: (None: the profile's default, or the value in ``config``).
_ADVANTAGE_DEFAULTS: Dict[str, Any] = dict(
    response_mask=None, index=None, epsilon=None, norm_adv_by_std_in_grpo=None, config=None, values=None,
    reward_baselines=None, old_log_probs=None, sum_pi_squared=None, rollout_is_weights=None, non_tensor_batch=None,
    batch=None, gamma=None, lam=None, f_norm=1.0, alpha=1.0, handle_zero_tail=True)


#: verl 0.9.1's estimator functions without ``**kwargs`` that verl's trainer may select by name: ``fastalign_e``
#: takes exactly their parameters (``fastalign_gae`` keeps the others, to name the ``values`` the trainer lacks)
_NO_KWARGS = ("grpo", "grpo_vectorized")


def _verl_signature(estimator: str) -> inspect.Signature:
    """verl's parameters of ``estimator`` in its order; unless verl's function has none (:data:`_NO_KWARGS`), then
    the other inputs keyword-only and ``**unused``."""
    P = inspect.Parameter
    own = _VERL_PARAMETERS[estimator]
    params = [P("token_level_rewards", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=_ADVANTAGE_DEFAULTS[n]) for n in own[1:]]
    if estimator in _NO_KWARGS:
        return inspect.Signature(params)
    params += [P(n, P.KEYWORD_ONLY, default=v) for n, v in _ADVANTAGE_DEFAULTS.items() if n not in own]
    return inspect.Signature(params + [P("unused", P.VAR_KEYWORD)])


def _advantage_fn(estimator: str) -> Callable:
    signature = _verl_signature(estimator)

    def advantage_fn(*args, **kwargs) -> tuple[Tensor, Tensor]:
        bound = signature.bind(*args, **kwargs)  # a TypeError for what verl's function would refuse to bind
        bound.apply_defaults()
        kw = {**_ADVANTAGE_DEFAULTS, **bound.arguments}
        kw.pop("unused", None)  # other keywords are ignored, as verl's **kwargs
        return _advantage(estimator, **kw)

    advantage_fn.__signature__ = signature
    advantage_fn.__name__ = advantage_fn.__qualname__ = f"{PREFIX}{estimator}_advantage"
    advantage_fn.__doc__ = (f"verl advantage estimator {estimator!r} computed by fastalign, returning "
                            "(advantages, returns), with the parameters of verl's function in its order: "
                            "see fastalign.integrations.verl.plugin.")
    return advantage_fn


def _advantage(estimator: str, token_level_rewards: Tensor, response_mask: Optional[Tensor], index,
               epsilon: Optional[float], norm_adv_by_std_in_grpo: Optional[bool], config: Any,
               values: Optional[Tensor], reward_baselines: Optional[Tensor], old_log_probs: Optional[Tensor],
               sum_pi_squared: Optional[Tensor], rollout_is_weights: Optional[Tensor], non_tensor_batch, batch,
               gamma: Optional[float], lam: Optional[float], f_norm: float, alpha: float,
               handle_zero_tail: bool) -> tuple[Tensor, Tensor]:
    """``fastalign_<estimator>`` once its arguments are bound."""
    if response_mask is None:
        raise ValueError(f"{PREFIX + estimator}: response_mask is required")
    if estimator == "gdpo" and norm_adv_by_std_in_grpo is not None and not norm_adv_by_std_in_grpo:
        raise ValueError(f"norm_adv_by_std_in_grpo=False is not supported by {PREFIX}gdpo (verl's gdpo would "
                         "center each reward column without dividing by its std)")
    # verl's grpo_vectorized is grpo computed at once, with the flag from its argument only: given, it is
    # fastalign's grpo with that flag; otherwise the profile of grpo_vectorized, which refuses a False in config
    vectorized_flag = estimator == "grpo_vectorized" and norm_adv_by_std_in_grpo is not None
    # verl's grpo_passk reads the flag from config only (its argument is ignored)
    flag = None if estimator == "grpo_passk" else norm_adv_by_std_in_grpo
    opts = _algo(config, "grpo" if vectorized_flag else estimator, flag)
    if vectorized_flag and index is not None and isinstance(token_level_rewards, Tensor) \
            and token_level_rewards.dim() == 2:  # grouped as verl's grpo_vectorized groups its uids
        index = group_keys_on("grpo_vectorized", index, token_level_rewards.shape[0], token_level_rewards.device)
    for name, value in (("gamma", gamma), ("lam", lam)):
        if value is not None and estimator != "gae":  # verl's function would ignore it (its **kwargs)
            raise ValueError(f"{name} does not apply to {PREFIX + estimator}: verl's function ignores it "
                             f"(set algorithm.{name} in config)")
        if value is not None:
            opts[name] = float(value)
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
                                     rollout_is_weights=rollout_is_weights, epsilon=epsilon,
                                     **({"handle_zero_tail": handle_zero_tail} if estimator in _TRAINER_OWN_INPUTS
                                        else {}))
    if estimator == "gpg" and f_norm != 1.0:
        adv = adv / f_norm
        returns = adv
    return adv, returns


def _grpo_batch_std_advantage(token_level_rewards: Tensor, response_mask: Optional[Tensor] = None, index=None,
                              epsilon: float = 1e-6, norm_adv_by_std_in_grpo: Optional[bool] = None,
                              config: Any = None, **unused) -> tuple[Tensor, Tensor]:
    """``(r - mean_group(r)) / (std_batch(r) + epsilon)`` spread over the response tokens (fastalign's
    grpo with ``std="batch"``; a group of one gets 0); ``r`` the row sums of the token rewards."""
    if response_mask is None or index is None:
        raise ValueError(f"{PREFIX}grpo_batch_std needs response_mask and index (the uid of each response)")
    check_keys(config, ALGO, "algorithm")
    flag = norm_adv_by_std_in_grpo if norm_adv_by_std_in_grpo is not None else _get(config, "norm_adv_by_std_in_grpo",
                                                                                   True)
    if not flag:
        raise ValueError(f"norm_adv_by_std_in_grpo=False contradicts {PREFIX}grpo_batch_std (it divides by the batch "
                         f"std); use {PREFIX}grpo")
    given = sorted(k for k, v in unused.items() if v is not None and k not in ("reward_baselines",))
    if given:
        raise ValueError(f"{PREFIX}grpo_batch_std does not use {given}")
    scores = token_level_rewards.sum(dim=-1)
    adv = group_advantages(scores, index, estimator="grpo", std="batch", singleton="zero", eps=float(epsilon))
    adv = token_advantages(adv, response_mask)
    return adv, adv


_grpo_batch_std_advantage.__name__ = _grpo_batch_std_advantage.__qualname__ = f"{PREFIX}grpo_batch_std_advantage"

#: ``fastalign_<mode>`` → its verl policy-loss function.
POLICY_LOSSES: Dict[str, Callable] = {PREFIX + m: _policy_loss_fn(m) for m in _MODES}
#: ``fastalign_<estimator>`` → its verl advantage-estimator function.
ADVANTAGE_ESTIMATORS: Dict[str, Callable] = {
    **{PREFIX + e: _advantage_fn(e) for e in ESTIMATORS},
    PREFIX + "grpo_batch_std": _grpo_batch_std_advantage,  # no verl counterpart
}
# each function is also this module's attribute under its own name, where pickle looks it up (a spawned worker,
# a saved trainer state): ``fastalign_<mode>_policy_loss``, ``fastalign_<estimator>_advantage``
globals().update({fn.__name__: fn for fn in (*POLICY_LOSSES.values(), *ADVANTAGE_ESTIMATORS.values())})


def register() -> None:
    """Put :data:`POLICY_LOSSES` and :data:`ADVANTAGE_ESTIMATORS` into verl's registries, and
    ``fastalign_forward_kl_topk`` among its distillation losses (:mod:`fastalign.integrations.verl.distillation`,
    when verl imports them), make ``fused_kernel_options.impl_backend=fastalign`` a fused-kernel backend and, with
    ``FASTALIGN_VERL_MEGATRON=1``, fastalign the logits processor of verl's Megatron engine (idempotent)."""
    from verl.trainer.ppo import core_algos

    from fastalign.integrations.verl import distillation, fused, megatron

    fused.enable()
    distillation.enable()
    for name, fn in POLICY_LOSSES.items():
        core_algos.register_policy_loss(name)(fn)
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            core_algos.register_adv_est(name)(fn)
    megatron.enable_from_environment()


register()
