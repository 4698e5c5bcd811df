"""The label's logit of a head at each position, from one row of the head per position (never ``[V, H]`` in fp32,
never the ``[N, V]`` logits): the adapters' label-smoothing and z-loss terms read it beside the fused log-probs."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def label_logits(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None, low_rank=None,
                 logit_scale: float = 1.0, softcap: Optional[float] = None, minus_mean: bool = False) -> Tensor:
    r"""``z_y [...]`` (fp32, differentiable) of ``hidden [..., H]`` for the ids ``labels [...]`` (in range: the caller
    clamps ignored ones), with the head's pipeline ``z = c tanh(s u / c)`` (``z = s u`` without a softcap ``c``),
    ``u_y = h · W_y + a · L_y + b_y`` (``low_rank = (a, L)``). The rows are gathered by ``F.embedding`` (a sorted,
    deterministic backward) and multiplied in fp32. ``minus_mean`` (a linear head only): ``z_y - (1/V) Σ_j z_j``,
    still linear in ``h``, ``s (h · (W_y - mean_j W_j) + a · (L_y - mean_j L_j) + b_y - mean_j b_j)``, no
    vocabulary pass."""
    if minus_mean and softcap is not None:
        raise ValueError("minus_mean applies to a linear head: a softcapped head's mean logit is not linear in h")

    def term(x: Tensor, w: Tensor) -> Tensor:  # x · w_y (- x · mean_j w_j) per position, in fp32
        x = x.float()
        out = torch.linalg.vecdot(x, F.embedding(labels, w).float())
        return out - x @ w.mean(0, dtype=torch.float32) if minus_mean else out

    u = term(hidden, weight)
    if low_rank is not None:
        u = u + term(*low_rank)
    if bias is not None:
        u = u + bias.float()[labels] - (bias.mean(dtype=torch.float32) if minus_mean else 0.0)
    return u * logit_scale if softcap is None else softcap * torch.tanh(u * (logit_scale / softcap))
