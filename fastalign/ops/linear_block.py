"""One block of rows through the LM head in one pass: logits, statistics, then d(inputs).

When the gradient of a loss with respect to each token log-prob is known as soon as the
statistics of a *block* of rows are (a preference loss over a few whole pairs is), the
block's logits need not be recomputed in a backward pass. Per block:

    z      = softcap(scale * (h @ W.T + b))                      (kept: [rows, V])
    lp, lse, sum p^2 or H = token_stats(z / T)                   (C++ / Triton row kernels)
    g      = d loss / d lp (and d loss / d H)                    (the caller's, from lp)
    dz     = d loss / d z, written over z in place               (token_stats backward)
    dh     = dz @ W,   dW += dz.T @ h,   db += sum_rows dz

three matrix products per block instead of the four of a forward plus a recomputing
backward. The price is the block's logits in memory: the caller sizes the block.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign.ops.linear_cpu import chunk_grad_to_inputs, chunk_logits, softcap_derivative
from fastalign.ops.token_stats import backward_into, token_stats


def block_buffer(rows: int, vocab: int, like: Tensor) -> Tensor:
    """A flat buffer for ``rows x vocab`` logits: the input dtype on a GPU, fp32 on the CPU."""
    dtype = like.dtype if like.is_cuda else torch.float32
    return torch.empty(rows * vocab, dtype=dtype, device=like.device)


def block_forward(buf: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                  scale: float, softcap: float, inv_t: float, ignore_index: int, aux: Optional[str], backend: str,
                  live: Optional[Tensor] = None):
    """Logits of the rows ``h [n, H]`` into ``buf`` and their statistics.

    Returns ``(z, deriv, lp, aux, lse)``: ``z`` the kept logits, ``deriv`` the softcap
    derivative (None without softcap), ``aux`` the ``"sum_p2"`` or ``"entropy"`` of each row
    (None when ``aux`` is None). ``live``: the labelled rows come first and only those ``live`` rows
    are multiplied (:mod:`~fastalign.ops.device_compaction`)."""
    native = buf.dtype == h.dtype
    hw = (h, weight, bias) if native else tuple(None if t is None else t.float() for t in (h, weight, bias))
    z = chunk_logits(buf, *hw, scale, softcap, live=live)
    deriv = softcap_derivative(z, softcap, scale) if softcap > 0 else None
    lp, ent, sp2, _amax, lse = token_stats(z.unsqueeze(0), labels, inv_t, ignore_index, aux == "entropy",
                                           aux == "sum_p2", False, backend, True)
    return z, deriv, lp, {None: None, "sum_p2": sp2, "entropy": ent}[aux], lse


def block_backward(z: Tensor, deriv: Optional[Tensor], g_lp: Tensor, h: Tensor, weight: Tensor,
                   labels: Tensor, lse: Tensor, *, scale: float, softcap: float, inv_t: float, ignore_index: int,
                   backend: str, dw: Optional[Tensor], db: Optional[Tensor], g_ent: Optional[Tensor] = None,
                   ent: Optional[Tensor] = None, live: Optional[Tensor] = None) -> Tensor:
    """Turn the kept logits ``z`` into d(logits) in place for token gradients ``g_lp`` (and ``g_ent`` of
    the entropies ``ent``); accumulate ``dw``/``db`` and return ``dh [n, H]`` (fp32 on the CPU, the input
    dtype on a GPU). ``live``: as in :func:`block_forward` (``dh`` is 0 past it)."""
    empty = lse.new_empty(0)
    z3 = z.unsqueeze(0)
    backward_into(z3, g_lp, g_ent, None, z3, labels, lse, empty if ent is None else ent, empty, inv_t, ignore_index,
                  backend)
    native = z.dtype == h.dtype
    h_c, w_c = (h, weight) if native else (h.float(), weight.float())
    dh = torch.empty(h.shape, dtype=z.dtype, device=z.device)
    chunk_grad_to_inputs(z, deriv, scale, softcap, h_c, w_c, dh, dw, db, accumulate=False, live=live)
    return dh


def block_rows(vocab: int, like: Tensor, budget_bytes: float) -> int:
    """Rows of logits that fit in ``budget_bytes`` (at least one)."""
    elem = like.element_size() if like.is_cuda else 4
    return max(1, int(budget_bytes // max(vocab * elem, 1)))


def block_logprobs(h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *, rows: int, scale: float,
                   softcap: float, inv_t: float, ignore_index: int, backend: str) -> Tensor:
    """fp32 log-probs of the rows of ``h [n, H]``, ``rows`` at a time (no gradient): one
    matrix product and one statistics pass per block."""
    n = h.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    buf = block_buffer(min(rows, max(n, 1)), weight.shape[0], h)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        _z, _d, lp, _aux, _lse = block_forward(buf, h[r0:r1], weight, bias, labels[r0:r1], scale=scale,
                                               softcap=softcap, inv_t=inv_t, ignore_index=ignore_index,
                                               aux=None, backend=backend)
        out[r0:r1] = lp
    return out
