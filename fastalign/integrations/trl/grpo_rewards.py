"""TRL 1.16 ``GRPOTrainer`` advantages from fastalign's group kernels.

:func:`grpo_advantages` reproduces how ``GRPOTrainer`` turns the reward functions' outputs of one
generation batch (every process's, as TRL gathers them) into advantages. A row where every
function returned None (NaN) is unscorable: it stays out of every statistic and gets 0.

``multi_objective_aggregation="sum_then_normalize"`` (TRL's default): ``r = Σ_k w_k x_k`` (NaN
entries skipped), then with ``mean``/``std`` (unbiased) over the scorable rows of each prompt's
``num_generations`` consecutive rows::

    scale_rewards="group":  A = (r - mean_group) / (std_group + 1e-4)
    scale_rewards="batch":  A = (r - mean_group) / (std_batch + 1e-4)
    scale_rewards="none":   A =  r - mean_group                        (Dr. GRPO)

``"normalize_then_sum"`` (GDPO): each reward column is normalised in its group as ``"group"``
above, the columns are summed with the weights (NaN entries skipped, TRL's ``nansum``: a column
that an infinite reward makes NaN in its group drops out of the sum there), and the sum is
normalised over the batch. TRL
ignores ``scale_rewards`` there; the profile raises unless it is the default ``"group"``.

A group with a single scorable row gives it 0 (TRL's NaN std, then ``nan_to_num``). The result
ends with TRL's ``torch.nan_to_num(advantages, nan=0.0)``: a NaN that an infinite reward leaves
becomes 0, ±inf the largest finite float. Statistics
accumulate in float64, so a group of equal rewards gets exactly 0 (TRL's float32 mean can leave
``~1e-7 / 1e-4`` there).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from fastalign.advantages import group_advantages
from fastalign.advantages.sequence_level import reads_eps
from fastalign.integrations.trl._config import read_fields
from fastalign.integrations.trl._rewards import reward_columns

__all__ = ["GRPO_ADVANTAGE_DEFAULTS", "grpo_advantages"]

#: TRL 1.16's ``GRPOConfig`` defaults for the fields the advantages read.
GRPO_ADVANTAGE_DEFAULTS: Dict[str, Any] = dict(num_generations=8, num_generations_eval=None, reward_weights=None,
                                               scale_rewards="group",
                                               multi_objective_aggregation="sum_then_normalize")
SCALE_EPS = 1e-4  # GRPOTrainer's std offset
_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
_SCALES = {True: "group", False: "none", "group": "group", "batch": "batch", "none": "none"}


def _normalize_then_sum(cols, G: int) -> Tensor:
    """TRL's GDPO: each column normalised in its groups, ``nansum`` of the weighted columns, then
    normalised over the scorable rows of the batch. A column entry that is NaN drops out of the sum
    (a missing reward, or an infinite reward's group, whose column TRL's arithmetic makes NaN)."""
    total = None
    for k in range(cols.values.shape[1]):  # F reward columns: a static Python int
        a = group_advantages(cols.values[:, k], group_size=G, estimator="grpo", eps=SCALE_EPS, singleton="zero")
        a = torch.where(torch.isnan(a), 0.0, a * cols.weights[k])
        total = a if total is None else total + a
    total = torch.where(cols.unscorable, float("nan"), total)
    return group_advantages(total, group_size=total.shape[0], estimator="grpo", eps=SCALE_EPS, singleton="zero")


def reward_scaling(config) -> tuple[str, str]:
    """``(scale, multi_objective_aggregation)`` of a ``GRPOConfig`` (or dict), ``scale`` one of ``"group"``,
    ``"batch"``, ``"none"``; a ``ValueError`` naming the field for a value TRL does not take, and for a
    ``scale_rewards`` other than ``"group"`` with ``"normalize_then_sum"``, which TRL ignores there."""
    c = read_fields(config, GRPO_ADVANTAGE_DEFAULTS, "GRPOConfig")
    scale = _SCALES.get(c["scale_rewards"])
    if scale is None:
        raise ValueError(f"scale_rewards must be one of 'group', 'batch', 'none' (or a bool), "
                         f"got {c['scale_rewards']!r}")
    aggregation = c["multi_objective_aggregation"]
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "normalize_then_sum" and scale != "group":
        raise ValueError(f"scale_rewards={c['scale_rewards']!r} does not apply with multi_objective_aggregation="
                         "'normalize_then_sum' (TRL 1.16 normalises each column by its group std and the sum by the "
                         "batch std whatever it is)")
    return scale, aggregation


def grpo_advantages(config, rewards_per_func: Tensor, *, training: bool = True) -> Tensor:
    """``[B]`` advantages of ``GRPOTrainer`` (TRL 1.16) for one generation batch (see the module doc).

    Args:
        config: ``GRPOConfig`` or a dict: ``num_generations`` (``num_generations_eval`` when not
            training, if set), ``reward_weights``, ``scale_rewards``, ``multi_objective_aggregation``.
        rewards_per_func: ``[B, F]`` rewards of the F reward functions over every process (NaN where
            a function returned None), ``B`` a multiple of the group size (each prompt's completions
            consecutive). Slice the result for this process's rows, as TRL does.
        training: whether the batch is a training batch (else the evaluation group size).
    """
    c = read_fields(config, GRPO_ADVANTAGE_DEFAULTS, "GRPOConfig")
    G = int(c["num_generations"] if training else c["num_generations_eval"] or c["num_generations"])
    scale, aggregation = reward_scaling(c)
    cols = reward_columns(rewards_per_func, c["reward_weights"], G)
    if aggregation == "normalize_then_sum":
        adv = _normalize_then_sum(cols, G)
    else:
        eps = {"eps": SCALE_EPS} if reads_eps("grpo", scale) else {}  # scale_rewards="none" divides by nothing
        adv = group_advantages(cols.weighted_sum(), group_size=G, estimator="grpo", std=scale, singleton="zero",
                               **eps)
    return torch.nan_to_num(adv, nan=0.0)  # TRL's last step: NaN (from an infinite reward) to 0, ±inf to ±max
