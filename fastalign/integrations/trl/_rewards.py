"""What the profiles of TRL's online trainers (``GRPOTrainer``, ``RLOOTrainer``) read besides the model:
config fields with TRL's defaults, and the reward columns."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastalign import _validate


class RewardColumns(NamedTuple):
    """``values [B, F]`` (float32, or float64 when given so), ``weights [F]`` and ``unscorable [B]``: the
    rows where every reward function returned None (NaN)."""

    values: Tensor
    weights: Tensor
    unscorable: Tensor

    def weighted_sum(self) -> Tensor:
        """``Σ_k w_k x_k`` per row, NaN entries skipped; NaN for an unscorable row."""
        return torch.where(self.unscorable, float("nan"), (self.values * self.weights).nansum(dim=1))


def reward_columns(rewards_per_func: Tensor, reward_weights, group_size: int) -> RewardColumns:
    """Check ``rewards_per_func [B, F]`` (``B`` a multiple of ``group_size``) and ``reward_weights``
    (None: 1 each) and return them as :class:`RewardColumns`."""
    _validate.real("rewards_per_func", rewards_per_func)  # a dense tensor of real numbers (TRL's is float32)
    if rewards_per_func.dim() != 2:
        raise ValueError("rewards_per_func must be a [B, F] tensor (one column per reward function)")
    B, F_ = rewards_per_func.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"num_generations={group_size} must divide the number of completions {B}")
    x = rewards_per_func.to(torch.promote_types(rewards_per_func.dtype, torch.float32))
    w = (torch.ones(F_, dtype=x.dtype, device=x.device) if reward_weights is None else
         torch.as_tensor(reward_weights, dtype=x.dtype, device=x.device))
    if w.shape != (F_,):
        raise ValueError(f"reward_weights has {w.numel()} entries for {F_} reward functions")
    return RewardColumns(x, w, torch.isnan(x).all(dim=1))
