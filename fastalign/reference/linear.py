"""Reference for docs/math.md#token-statistics from hidden states: build the full logits, then the same statistics on them."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign.reference.logprobs import eager_logprobs_entropy, token_logprobs


def linear_logits(hidden: Tensor, weight: Tensor, *, bias: Optional[Tensor] = None, softcap: Optional[float] = None,
                  logit_scale: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """``z = logit_scale * (h @ W.T + b)``, then ``softcap * tanh(z / softcap)`` (before the temperature)."""
    dt = dtype or torch.float32
    z = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        z = z + bias.to(dt)
    z = logit_scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                    temperature: float = 1.0, softcap: Optional[float] = None, logit_scale: float = 1.0,
                    ignore_index: int = -100, dtype: torch.dtype | None = None):
    """(logprobs, entropy, sum_p2, argmax) from the materialised ``[..., V]`` logits."""
    z = linear_logits(hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale, dtype=dtype)
    return token_logprobs(z, labels, temperature=temperature, ignore_index=ignore_index, dtype=dtype)


def linear_topk_logprobs(hidden: Tensor, weight: Tensor, k: Optional[int] = None, *, ids: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, temperature: float = 1.0, softcap: Optional[float] = None,
                         logit_scale: float = 1.0, dtype: torch.dtype | None = None, renormalize: bool = False):
    """(log-probs ``[..., K]`` at ``ids``, ``ids``) from the materialised logits; ``ids`` the top ``k`` when not
    given; ``renormalize``: over the support instead of the vocabulary (docs/math.md#top-k-support)."""
    z = linear_logits(hidden, weight, bias=bias, softcap=softcap, logit_scale=logit_scale, dtype=dtype) / temperature
    if ids is None:
        ids = z.topk(k, dim=-1).indices
    if renormalize:
        return z.gather(-1, ids).log_softmax(-1), ids
    return z.log_softmax(-1).gather(-1, ids), ids


def eager_linear_logprobs_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0):
    """The benchmark baseline: logits by matmul, then log_softmax, gather and entropy, as trainers write it."""
    return eager_logprobs_entropy(hidden @ weight.T, labels, temperature)
