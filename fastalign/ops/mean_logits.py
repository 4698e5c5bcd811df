"""The mean logit of a softcapped head over the rows asked for, a block of rows at a time (no gradient).

    u_j = h . W_j + a . L_j + b_j,   z_j = c tanh(s u_j / c),   mean = (1/V) sum_j z_j

The logits are the single pass's (:func:`fastalign.ops.linear_block.block_logits`, in the block buffer's dtype),
so this mean equals the one a loss's pass keeps. Only the rows asked for are multiplied: picked on the host by the
C++ backend (a CPU tensor's count is free), put first and counted on the device by the others
(:mod:`fastalign.ops.device_compaction`: the product kernel reads the count, no host sync).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign.ops._launch import eager
from fastalign.ops.device_compaction import compact
from fastalign.ops.linear_block import block_buffer, block_logits, row_blocks
from fastalign.ops.linear_cpu import labelled_rows, scatter_labelled
from fastalign.ops.single_pass import block_budget_rows


@torch.no_grad()
def softcapped_mean_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], a: Optional[Tensor],
                           lora: Optional[Tensor], scale: float, softcap: float, keep: Optional[Tensor],
                           backend: str) -> Tensor:
    """``mean_j z_j`` (fp32) of each row of ``h [n, H]`` (``a [n, r]`` its low-rank rows, ``lora [V, r]``) kept by
    ``keep [n]`` (bool; None: every row), 0 for the others."""
    picked = cmp = None
    if keep is not None and backend == "cpp" and eager(h, keep):
        picked = labelled_rows(keep, False)  # None when every row is kept
        if picked is not None:
            h, a = h.index_select(0, picked), None if a is None else a.index_select(0, picked)
    elif keep is not None:
        cmp = compact(torch.where(keep, 0, -1), -1)  # None with FASTALIGN_DEVICE_COMPACTION=0: every row
        if cmp is not None:
            h, a = cmp.gather(h), cmp.gather(a)
    rows = block_budget_rows(weight.shape[0], h)
    buf = block_buffer(min(rows, max(h.shape[0], 1)), weight.shape[0], h)
    means = []
    for block in row_blocks(h.shape[0], rows):  # blocks fixed by the shapes
        z = block_logits(buf, block.take(h), weight, bias, scale=scale, softcap=softcap,
                         low_rank=None if a is None else (block.take(a), lora),
                         live=None if cmp is None else cmp.live_in(block.start, block.stop))
        means.append(z.mean(-1, dtype=torch.float32))
    mean = torch.cat(means) if means else h.new_zeros(0, dtype=torch.float32)
    if picked is not None:
        return scatter_labelled(mean, picked, keep, 0.0)
    if cmp is not None:
        mean = cmp.scatter(mean)
    return mean if keep is None else torch.where(keep, mean, 0.0)
