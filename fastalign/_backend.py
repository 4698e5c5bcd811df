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
    if name == "cuda" and not cuda_kernels_usable(device):  # warned once; the Triton kernels run instead
        return "triton"
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


def cuda_op_backend(backend: str, device) -> str:
    """For an op with both CUDA C++ and Triton kernels: ``"triton"`` where ``"cuda"`` was chosen
    but the compiled CUDA kernels cannot run on ``device`` (:func:`cuda_kernels_usable`)."""
    if backend == "cuda" and not cuda_kernels_usable(device):
        return "triton"
    return backend


_cuda_usable: dict = {}


def _arch_runs(archs: str, capability: int) -> bool:
    """Whether code built for ``archs`` ("80-real,90-real,100" as CMake lists them) runs on sm_``capability``:
    machine code of the same major and a lower or equal minor version, or PTX of a lower or equal version."""
    for arch in filter(None, archs.split(",")):
        number, _, kind = arch.partition("-")
        n = int(number.rstrip("af"))
        if kind in ("", "real") and n // 10 == capability // 10 and n <= capability:
            return True
        if kind in ("", "virtual") and n <= capability:
            return True
    return False


def cuda_kernels_usable(device) -> bool:
    """Whether the CUDA kernels compiled into ``fastalign._C`` can run on ``device``.

    False when the build has none (built without nvcc), when the driver is older than
    the CUDA runtime they were built with, or when the GPU's architecture is not among
    the compiled ones. The caller then runs the op's Triton path; one warning line per
    device says why. Never raises.
    """
    import torch

    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    if index in _cuda_usable:
        return _cuda_usable[index]
    reason = None
    try:
        from fastalign import _C
    except ImportError:
        _C = None
    if _C is None or not getattr(_C, "cuda_compiled", False):
        reason = "this build of fastalign has no CUDA kernels"
    else:
        driver, runtime, count, error = _C.cuda_runtime_status()
        archs = _C.build_info()["cuda_archs"]
        major, minor = torch.cuda.get_device_capability(index)
        if error or count == 0:
            reason = (f"the CUDA driver ({driver // 1000}.{driver % 1000 // 10}) cannot run kernels built with "
                      f"CUDA {runtime // 1000}.{runtime % 1000 // 10}: {error or 'no device'}")
        elif not _arch_runs(archs, 10 * major + minor):
            reason = f"its CUDA kernels are built for sm_{archs.replace(',', ', sm_')}, not sm_{major}{minor}"
    _cuda_usable[index] = reason is None
    if reason is not None:
        import warnings

        warnings.warn(f"fastalign: {reason}; cuda:{index} runs the Triton kernels instead", RuntimeWarning,
                      stacklevel=3)
    return reason is None
