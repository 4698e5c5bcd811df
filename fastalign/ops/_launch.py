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


def stat_outputs(n: int, device, entropy: bool, sum_p2: bool, argmax: bool, argmax_value: bool = False):
    """Per-row outputs of the statistics ops: (logprobs, entropy, sum_p2, argmax[, argmax logit], lse),
    fp32 (argmax int64); the ones not requested are empty."""
    f32 = dict(device=device, dtype=torch.float32)
    out = [torch.empty(n, **f32), torch.empty(n if entropy else 0, **f32), torch.empty(n if sum_p2 else 0, **f32),
           torch.empty(n if argmax else 0, device=device, dtype=torch.int64)]
    if argmax_value:
        out.append(torch.empty(n if argmax else 0, **f32))
    return (*out, torch.empty(n, **f32))


def triton_kernels(name: str):
    """``fastalign.kernels.<name>``, imported on first use (Triton is optional on CPU)."""
    return importlib.import_module(f"fastalign.kernels.{name}")
