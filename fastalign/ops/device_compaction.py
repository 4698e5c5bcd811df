"""The labelled rows first, found on the device: no vocabulary work for unscored tokens, no host sync.

Prompt and tool-output tokens carry ``ignore_index`` labels. On the CPU the C++ path finds the
labelled rows on the host (their count is free there). On a GPU reading the count back would
stall the stream, so the Triton paths permute the rows instead:

    order = the labelled rows in their order, then the others      (a stable sort of the mask)
    live  = number of labelled rows                                 (a one-element device tensor)

and every LM-head product runs over the first ``live`` rows only (``fastalign/kernels/live_matmul.py``
reads ``live`` on the device; the Triton logit kernels skip blocks of ignored rows). Outputs are
put back in place by ``order``. ``FASTALIGN_DEVICE_COMPACTION=0`` turns this off: every row then
goes through the products (cuBLAS), the ignored ones multiplied by zero gradients.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign.ops._launch import eager, on_device, triton_kernels


class Compaction(NamedTuple):
    """A permutation that puts the labelled rows first, and their count on the device."""

    order: Tensor  # [n] int64
    live: Tensor  # [1] int64

    def gather(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """``t`` (rows first) in compacted order; None stays None."""
        return None if t is None else t.index_select(0, self.order)

    def scatter(self, t: Tensor, into: Optional[Tensor] = None) -> Tensor:
        """Compacted rows ``t`` put back in place (into ``into`` when given)."""
        into = torch.empty_like(t) if into is None else into
        return into.index_copy_(0, self.order, t)

    def live_in(self, start: int, stop: int) -> Tensor:
        """How many of the compacted rows ``start .. stop-1`` are labelled (a device tensor)."""
        return (self.live - start).clamp_(0, stop - start)


def enabled() -> bool:
    """``FASTALIGN_DEVICE_COMPACTION`` (default 1): whether the Triton paths compact the labelled rows."""
    value = os.environ.get("FASTALIGN_DEVICE_COMPACTION", "1")
    if value not in ("0", "1"):
        raise ValueError(f"FASTALIGN_DEVICE_COMPACTION must be 0 or 1, got {value!r}")
    return value == "1"


def compact(labels: Tensor, ignore_index: int) -> Optional[Compaction]:
    """The :class:`Compaction` of the flat ``labels`` (None when turned off)."""
    if not enabled():
        return None
    ignored = labels == ignore_index
    order = torch.argsort(ignored.to(torch.uint8), stable=True)
    return Compaction(order, (~ignored).sum(dtype=torch.int64).reshape(1))


def matmul_live(out: Tensor, a: Tensor, b: Tensor, live: Tensor, live_dim: int, accumulate: bool) -> None:
    """``out (+)= a @ b`` over the first ``live`` rows of ``a`` (``live_dim`` 0: the other rows of ``out``
    are 0, or unchanged when accumulating) or of the shared dimension (``live_dim`` 1); fp32
    accumulation, one rounding into ``out``'s dtype."""
    with on_device(out):
        triton_kernels("live_matmul").live_matmul(out, a, b, live, live_dim, accumulate)


def scored_order(mask: Tensor):
    """The rows of ``mask != 0`` to scan first: ``(order, compaction)``, the row indices in scan order (None: every
    row in place) and the :class:`Compaction` whose count bounds the products (None: none).

    CPU: the scored rows, found on the host. GPU: every row, the scored ones first, and their count on
    the device (no host sync); every row in place when device compaction is off. Traced (torch.compile, fake tensors):
    every row in place (the kernels give unscored rows 0), no value read."""
    if not eager(mask):
        return None, None
    if mask.device.type == "cpu":
        keep = mask != 0
        return (None if bool(keep.all()) else keep.nonzero().squeeze(1)), None
    cmp = compact(torch.where(mask != 0, 0, -1), -1)
    return (None, None) if cmp is None else (cmp.order, cmp)
