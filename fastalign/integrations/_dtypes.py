"""Input dtypes the adapters widen or narrow to match a trainer's own handling."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def float64_as_float32(t: Optional[Tensor]) -> Optional[Tensor]:
    """A float64 tensor as float32 (the kernels' widest input, as Liger casts its per-token inputs); other tensors,
    and None, as they are."""
    return t.float() if t is not None and t.dtype == torch.float64 else t
