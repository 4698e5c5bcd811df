r"""TRL 1.16 ``A2POTrainer`` profile (``trl.experimental.a2po``): A*-PO, optimal advantage regression.

A*-PO estimates each prompt's optimal value once, offline, from ``n`` samples of the reference policy, then
regresses the policy's implicit reward on the optimal advantage of one on-policy completion per prompt:

.. math::

    V^*(x) = \beta_1 \Bigl(\operatorname{logsumexp}_i \frac{r_i}{\beta_1} - \log n\Bigr),
    \qquad \text{loss} = \operatorname{mean}_b \bigl(\beta_2 (s_b - s^{ref}_b) - (r_b - V^*(x_b))\bigr)^2

with ``s`` the summed completion log-probs of the policy and ``s_ref`` the reference's. ``beta1`` and ``beta2`` are
``A2POConfig``'s. :func:`a2po_optimal_values` gives ``V*``; :class:`A2POLoss` the loss and TRL's metrics from the
policy's per-token log-probs, so that from hidden states it goes through the head in one pass over whole rows
(:func:`fastalign.linear_step.separable_step` with ``items="rows"``: the loss is a mean of per-row terms).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.integrations.trl._config import read_fields
from fastalign.sequence import sequence_logprobs

__all__ = ["A2PO_DEFAULTS", "A2POLoss", "a2po_optimal_values"]

#: the ``A2POConfig`` fields A*-PO's values and loss read, with TRL 1.16's defaults
A2PO_DEFAULTS: Dict[str, Any] = dict(beta1=0.5, beta2=1e-3)


def _beta(c: Dict[str, Any], field: str) -> float:
    return _validate.positive(f"A2POConfig.{field}", c[field])


def a2po_optimal_values(config, rewards: Tensor) -> Tensor:
    r"""``V*`` per prompt ``[P]`` from the rewards of ``n`` reference samples per prompt ``[P, n]``:
    ``beta1 (logsumexp_i(r_i / beta1) - log n)`` (a soft maximum: the mean reward as ``beta1 -> inf``, the best
    as ``beta1 -> 0``), in the rewards' dtype (float32 or float64). ``beta1`` is ``A2POConfig.beta1`` (> 0)."""
    beta1 = _beta(read_fields(config, A2PO_DEFAULTS, "A2POConfig"), "beta1")
    _validate.real("rewards", rewards, dim=2)
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a float tensor, got {rewards.dtype}")
    if rewards.shape[1] == 0:
        raise ValueError("rewards must hold at least one sample per prompt, got shape "
                         f"{tuple(rewards.shape)}")
    return beta1 * (torch.logsumexp(rewards / beta1, dim=1) - math.log(rewards.shape[1]))


class A2POLoss(nn.Module):
    """``A2POTrainer``'s loss and metrics (TRL 1.16) from the policy's per-token log-probs of one completion per
    prompt: ``forward(per_token_logps [B, T], completion_mask [B, T], ref_logps [B], rewards [B], v_star [B])``,
    ``ref_logps`` the reference's summed completion log-probs and ``v_star`` :func:`a2po_optimal_values` of each
    prompt (see the module doc).

    Metrics (TRL's names): ``implicit_reward``, the mean of ``beta2 (s - s_ref)``, and ``advantage``, the mean of
    ``r - V*``. ``ref_logps``, ``rewards`` and ``v_star`` are constants (no gradient reaches them)."""

    def __init__(self, config=None):
        super().__init__()
        self.beta2 = _beta(read_fields(config, A2PO_DEFAULTS, "A2POConfig"), "beta2")

    def forward(self, per_token_logps: Tensor, completion_mask: Tensor, ref_logps: Tensor, rewards: Tensor,
                v_star: Tensor):
        _validate.any_float("per_token_logps", per_token_logps, dim=2)
        _validate.like(tuple(per_token_logps.shape), "like per_token_logps", kind="real", required=True,
                       device=per_token_logps.device, device_of="per_token_logps", completion_mask=completion_mask)
        _validate.like((per_token_logps.shape[0],), "one per row of per_token_logps", required=True,
                       device=per_token_logps.device, device_of="per_token_logps", ref_logps=ref_logps,
                       rewards=rewards, v_star=v_star)
        s = sequence_logprobs(per_token_logps, completion_mask).sum
        implicit = self.beta2 * (s - ref_logps.detach().to(s.dtype))
        target = (rewards.detach() - v_star.detach()).to(s.dtype)
        loss = ((implicit - target) ** 2).mean()
        return loss, {"implicit_reward": implicit.detach().mean(), "advantage": target.mean()}
