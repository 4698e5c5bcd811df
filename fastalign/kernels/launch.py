"""Where a kernel runs and how it is launched: compiled for a GPU (or ahead of time, on ``meta`` tensors) or
interpreted on the CPU, the architecture compiled for, the SM count that sizes grids, the ``tl.dot`` precision of
fp32 inputs, and tile sizes a caller gives in place of a launcher's own. Shared by the kernel launchers."""
import os

import torch


def on_gpu(t) -> bool:
    """Compiled kernels (CUDA tensors, or ``meta`` tensors when compiling ahead of time) versus the
    Triton interpreter (CPU tensors)."""
    return t.device.type != "cpu"


def target_arch() -> int:
    """Compute capability Triton compiles for (the active driver's target: the device, or the
    architecture being compiled ahead of time)."""
    from triton.runtime import driver

    return int(driver.active.get_current_target().arch)


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device``, which size the grids that split the vocabulary; an H100's or
    H200's count off a GPU (ahead-of-time compilation)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 / H200 SXM, for ahead-of-time compilation


def matmul_precision(hidden) -> str:
    """``tl.dot`` precision: TF32 for fp32 inputs on a GPU unless ``FASTALIGN_FP32_MATMUL=ieee``."""
    if hidden.element_size() != 4 or not on_gpu(hidden):
        return "ieee" if hidden.element_size() == 4 else "tf32"  # bf16/fp16: native, the flag is unused
    choice = os.environ.get("FASTALIGN_FP32_MATMUL", "tf32")
    if choice not in ("tf32", "ieee"):
        raise ValueError(f"FASTALIGN_FP32_MATMUL must be 'tf32' or 'ieee', got {choice!r}")
    return choice


def tiled(config: tuple, tiles, names: tuple) -> tuple:
    """A launcher's ``(blocks, launch)`` ``config`` with ``tiles`` instead, ``(*sizes, num_warps, num_stages)``:
    the block sizes named ``names`` in order (None: ``config`` as it is)."""
    blocks, launch = config
    if tiles is None:
        return blocks, launch
    *sizes, warps, stages = tiles
    return {**blocks, **dict(zip(names, sizes, strict=True))}, dict(num_warps=warps, num_stages=stages)
