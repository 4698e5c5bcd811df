"""Small helpers shared by the ops: dtype codes, raw pointers, Triton kernels."""
from __future__ import annotations

import importlib

import torch

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer for the compiled core; 0 for a missing or empty optional output."""
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def opt(t: torch.Tensor | None) -> torch.Tensor | None:
    """Empty placeholder tensors (for outputs not requested) become None."""
    return None if t is None or t.numel() == 0 else t


def triton_kernels(name: str):
    """``fastalign.kernels.<name>``, imported on first use (Triton is optional on CPU)."""
    return importlib.import_module(f"fastalign.kernels.{name}")
