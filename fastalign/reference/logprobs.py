"""Reference for docs/math.md#token-statistics: per-token statistics from logits."""
from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                   dtype: torch.dtype | None = None):
    """(logprobs, entropy, sum_p2, argmax) via log_softmax + gather, as eager code does it.

    ``dtype`` upcasts first (float64 for the test oracle); default float32.
    """
    z = logits.to(dtype or torch.float32) / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    sp2 = (p * p).sum(-1)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return (torch.where(valid, lp, zero), torch.where(valid, ent, zero), torch.where(valid, sp2, zero),
            z.argmax(-1))


def eager_logprobs_entropy(logits: Tensor, labels: Tensor, temperature: float = 1.0):
    """The benchmark baseline: what trainers write by hand (log_softmax, gather, entropy)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent
