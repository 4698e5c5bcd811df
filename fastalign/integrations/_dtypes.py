"""Input checks and dtypes shared by the adapters: their tensors checked under the trainer's own argument names,
and widened or narrowed to match the trainer's own handling."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _validate


def float64_as_float32(t: Optional[Tensor]) -> Optional[Tensor]:
    """A float64 tensor as float32 (the kernels' widest input, as Liger casts its per-token inputs); other tensors,
    and None, as they are."""
    return t.float() if isinstance(t, Tensor) and t.dtype == torch.float64 else t


def check_accum_dtype(dtype) -> None:
    """Liger's ``accum_dtype`` (the dtype of its gradient accumulators): None or a floating ``torch.dtype``, else a
    ``TypeError``. fastalign accumulates in fp32 whatever it is, so it changes no result."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"accum_dtype must be None or a floating torch.dtype, got {dtype!r}")


def refuse_out_of_range(loss: Tensor, labels: Tensor, vocab: int, ignore_index: int, name: str) -> Tensor:
    """``loss``, refused when a label of ``labels`` (named ``name``) lies outside ``[0, vocab)`` and is not
    ``ignore_index``, as the trainers' own losses fail on it (an ``IndexError`` or an out-of-bounds read): a
    ``ValueError`` where the labels are an eager CPU tensor (read on the host for free), elsewhere the loss times
    NaN, so its gradients are NaN too (the fused ops give such a label a NaN log-prob with a finite gradient)."""
    bad = ((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).any()
    flag = _validate.flag_or_raise(bad, labels, lambda: f"{name} must lie in [0, {vocab}) or equal {ignore_index}")
    return _validate.nan_if(flag, loss)
