"""Backend choice: which kernel family runs an op.

``auto`` (the default) runs Triton kernels on CUDA tensors and the C++ kernels
on CPU tensors. ``FASTALIGN_BACKEND=triton|cpp|cuda`` or
``with fastalign.use_backend("triton"):`` forces one; Triton on CPU tensors
needs ``TRITON_INTERPRET=1`` (that is how the Triton kernels are tested
without a GPU).
"""
from __future__ import annotations

import contextlib
import os

BACKENDS = ("auto", "triton", "cpp", "cuda")

_forced: str | None = None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def current() -> str:
    """The backend in force: ``use_backend`` first, then FASTALIGN_BACKEND, else auto."""
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get("FASTALIGN_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block: ``with fastalign.use_backend("cpp"): ...``."""
    global _forced
    previous, _forced = _forced, _check_name(name)
    try:
        yield
    finally:
        _forced = previous


def resolve(device, backend: str | None = None) -> str:
    """Concrete backend ("triton", "cpp" or "cuda") for tensors on ``device``."""
    name = _check_name(backend) if backend is not None else current()
    is_cuda = device.type == "cuda"
    if name == "auto":
        return "triton" if is_cuda else "cpp"
    if name == "cpp" and is_cuda:
        raise ValueError("backend 'cpp' runs on CPU tensors only; got CUDA tensors")
    if name == "cuda" and not is_cuda:
        raise ValueError("backend 'cuda' needs CUDA tensors; got tensors on " + str(device))
    if name == "triton" and not is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
    return name


def compiled():
    """The compiled core ``fastalign._C`` (C++ CPU kernels, CUDA kernels when built with them)."""
    try:
        from fastalign import _C
    except ImportError as e:  # pragma: no cover - only when the package was not built
        raise RuntimeError(
            "fastalign._C is missing: install the package (pip install .) so the C++ kernels are built"
        ) from e
    return _C


def cuda_stream(tensor) -> int:
    import torch

    return torch.cuda.current_stream(tensor.device).cuda_stream


def cuda_kernels_available() -> bool:
    """Whether the compiled core holds the CUDA C++ kernels (built where nvcc was found). Without
    them, CUDA tensors run every op on its Triton (or plain-torch, on-device) path."""
    try:
        from fastalign import _C
    except ImportError:
        return False
    return bool(getattr(_C, "cuda_compiled", False))


def cuda_op_backend(backend: str) -> str:
    """For an op with both CUDA C++ and Triton kernels on CUDA tensors: ``"cuda"`` when the CUDA
    kernels were compiled, else ``"triton"`` (an explicit ``"triton"`` stays ``"triton"``)."""
    if backend == "cuda" and not cuda_kernels_available():
        return "triton"
    return backend
