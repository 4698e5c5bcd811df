"""Input checks and dtypes shared by the adapters: their tensors checked under the trainer's own argument names,
and widened or narrowed to match the trainer's own handling."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _validate


def required_like(expected, what: str, *, kind: str = "any_float", device=None,
                  device_of: str = "the other inputs", **tensors) -> None:
    """:func:`fastalign._validate.like` for required arguments (named as the caller names them): None, or
    anything else that is not a tensor, is a ``TypeError`` naming it (``like`` skips None, an optional
    argument left out)."""
    for name, t in tensors.items():
        _validate.KINDS[kind](name, t)
    _validate.like(expected, what, kind=kind, device=device, device_of=device_of, **tensors)


def float64_as_float32(t: Optional[Tensor]) -> Optional[Tensor]:
    """A float64 tensor as float32 (the kernels' widest input, as Liger casts its per-token inputs); other tensors,
    and None, as they are."""
    return t.float() if isinstance(t, Tensor) and t.dtype == torch.float64 else t
