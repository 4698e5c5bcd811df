"""TRL 1.16 ``RLOOTrainer`` profile: its advantages and its loss from fastalign's kernels.

:func:`rloo_advantages` reproduces how ``RLOOTrainer`` turns the reward functions' outputs into
advantages: weighted sum of the reward columns (a row where every function returned None — NaN —
is unscorable), ``reward_clip_range``, the sequence KL penalty ``- beta * KL`` when ``beta != 0``,
the leave-one-out baseline over the scorable completions of each prompt's ``num_generations``
consecutive rows (``num_generations_eval``, when set, for an evaluation batch), then, with
``normalize_advantages``, ``(A - mean) / (std + 1e-4)`` over the scorable completions of the batch.
Unscorable completions, and a completion alone in its group, get 0 (and stay out of the
normalisation), as in TRL. The result ends with TRL's
``torch.nan_to_num(advantages, nan=0.0)``: a NaN that an infinite reward leaves becomes 0, ±inf the
largest finite float.

:class:`RLOOLoss` is ``RLOOTrainer._compute_loss``: a PPO clip on the *sequence* ratio of summed
log-probs, averaged over the completions (empty ones included)::

    rho_i = exp(Σ_t m_it lp_it - old_i),   L = mean_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)

with ``old_i`` the old policy's summed log-probs, and TRL's metrics ``entropy`` (token mean) and
``clip_ratio/*`` (over the completions). The loss is not divided by the gradient-accumulation steps
(TRL leaves that to ``transformers``' Trainer).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.advantages import group_advantages
from fastalign.integrations.trl._config import read_fields
from fastalign.integrations.trl._rewards import reward_columns
from fastalign.policy import policy_loss
from fastalign.sequence import sequence_logprobs

__all__ = ["RLOO_DEFAULTS", "RLOO_LOSS_DEFAULTS", "RLOOLoss", "rloo_advantages"]

#: TRL 1.16's ``RLOOConfig`` defaults for the fields the advantages read.
RLOO_DEFAULTS: Dict[str, Any] = dict(num_generations=2, num_generations_eval=None, beta=0.05, reward_weights=None,
                                     normalize_advantages=False, reward_clip_range=None)
NORMALIZE_EPS = 1e-4  # RLOOTrainer's std offset
#: TRL 1.16's ``RLOOConfig`` defaults for the fields the loss reads.
RLOO_LOSS_DEFAULTS: Dict[str, Any] = dict(epsilon=0.2, epsilon_high=None)


def rloo_advantages(config, rewards_per_func: Tensor, kl: Optional[Tensor] = None, *,
                    training: bool = True) -> Tensor:
    """``[B]`` advantages of ``RLOOTrainer`` (TRL 1.16) for one generation batch.

    Args:
        config: ``RLOOConfig`` or a dict: ``num_generations`` (when not training,
            ``num_generations_eval or num_generations``, as ``RLOOTrainer`` takes it), ``beta``,
            ``reward_weights``, ``normalize_advantages``, ``reward_clip_range``.
        rewards_per_func: ``[B, F]`` rewards of the F reward functions (NaN where a function
            returned None), ``B`` a multiple of the group size (each prompt's completions
            consecutive).
        kl: ``[B]`` per-sequence KL, ``sum_t m_t (old_t - ref_t)``; required when ``beta != 0``.
        training: whether the batch is a training batch (else the evaluation group size).
    """
    c = read_fields(config, RLOO_DEFAULTS, "RLOOConfig")
    G = int(c["num_generations"] if training else c["num_generations_eval"] or c["num_generations"])
    cols = reward_columns(rewards_per_func, c["reward_weights"], G)
    B = cols.values.shape[0]
    beta = _validate.finite_number("RLOOConfig.beta", c["beta"])
    if kl is not None:  # a scalar KL would cancel within each group: the penalty would silently vanish
        _validate.like((B,), "one per completion", device=cols.values.device, device_of="rewards_per_func", kl=kl)
    if beta != 0.0 and kl is None:
        raise ValueError("beta != 0 subtracts beta * KL from the rewards: give kl [B]")
    if beta == 0.0 and kl is not None:
        raise ValueError("kl does not apply with beta = 0")
    rewards = cols.weighted_sum()
    if c["reward_clip_range"] is not None:
        lo, hi = c["reward_clip_range"]
        rewards = rewards.clamp(min=lo, max=hi)
    if beta != 0.0:
        rewards = rewards - beta * kl.to(rewards.dtype)
    if G == 1:  # TRL: no baseline without siblings
        return torch.zeros_like(rewards)
    adv = group_advantages(rewards, group_size=G, estimator="rloo", singleton="zero")
    if c["normalize_advantages"]:
        # scorable completions with a scorable sibling take part in the batch statistics
        scorable = ~torch.isnan(rewards)
        siblings = scorable.view(-1, G).sum(dim=1, keepdim=True).expand(-1, G).reshape(-1)
        kept = torch.where(scorable & (siblings > 1), adv, float("nan"))
        adv = group_advantages(kept, group_size=B, estimator="grpo", eps=NORMALIZE_EPS, singleton="zero")
    return torch.nan_to_num(adv, nan=0.0)  # TRL's last step: NaN (from an infinite reward) to 0, ±inf to ±max


class RLOOLoss:
    """``RLOOTrainer``'s loss from its ``RLOOConfig``: ``RLOOLoss(rloo_config)(logprobs, ...)`` (see the module doc).

    ``__call__(logprobs, old_logps, advantages, completion_mask, *, entropy)`` takes the per-token
    log-probs ``[B, T]`` of the policy, the old policy's summed log-probs ``old_logps [B]`` (TRL's
    ``inputs["old_logps"]``), the advantages ``[B]`` and the completion mask, and the per-token
    entropies for the logged ``entropy``; it returns ``(loss, metrics)`` under TRL's names, as 0-dim
    tensors over this process's completions (TRL gathers them over the processes).
    """

    def __init__(self, args: Any = None):
        self.args = args
        c = read_fields(args, RLOO_LOSS_DEFAULTS, "RLOOConfig")
        eps_low = _validate.finite_number("RLOOConfig.epsilon", c["epsilon"])
        self.eps_low, self.eps_high = eps_low, (eps_low if c["epsilon_high"] is None
                                                else _validate.finite_number("RLOOConfig.epsilon_high",
                                                                             c["epsilon_high"]))

    def __call__(self, logprobs: Tensor, old_logps: Tensor, advantages: Tensor, completion_mask: Tensor, *,
                 entropy: Tensor) -> tuple[Tensor, dict]:
        # checked under TRL's names before fastalign's ops read them under theirs
        _validate.floating("logprobs", logprobs, dim=2)
        B = logprobs.shape[0]
        dev = dict(device=logprobs.device, device_of="logprobs")
        _validate.like((B,), "one per completion", required=True, **dev, old_logps=old_logps)
        _validate.like((B,), "one per completion", required=True, kind="float", **dev, advantages=advantages)
        _validate.like(tuple(logprobs.shape), "logprobs.shape", required=True,
                       kind="real", **dev, completion_mask=completion_mask)
        _validate.like(tuple(logprobs.shape), "logprobs.shape: TRL logs its token mean", required=True,
                       **dev, entropy=entropy)
        mask = completion_mask.bool()
        logps = sequence_logprobs(logprobs, mask).sum  # Σ_t m_t lp_t, differentiable
        # one "token" per completion: the ppo row on the sequence ratio, averaged over every completion; TRL's
        # ratio exp(l) has no clamp (a sum over the completion drifts past the default cap of 20 quickly)
        loss, met = policy_loss(logps[:, None], old_logps.to(logps.dtype)[:, None], advantages,
                                torch.ones(B, 1, dtype=torch.bool, device=logps.device), loss_type="ppo",
                                agg="token-mean", eps_low=self.eps_low, eps_high=self.eps_high,
                                log_ratio_cap=math.inf)
        with torch.no_grad():
            m = mask.to(torch.float32)
            ent = (entropy.float() * m).sum() / m.sum().clamp(min=1.0)
        out = {"entropy": ent, "clip_ratio/low_mean": met["clip_low"], "clip_ratio/low_min": met["clip_low_min"],
               "clip_ratio/high_mean": met["clip_high"], "clip_ratio/high_max": met["clip_high_max"],
               "clip_ratio/region_mean": met["clip_region"]}
        return loss, out
