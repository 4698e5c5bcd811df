"""Backend choice: which kernel family runs an op.

The setting is ``with fastalign.use_backend(...):``, else ``FASTALIGN_BACKEND=auto|cpp|triton|cuda``,
else ``auto``; functions with a ``backend=`` argument take it first. Each custom op declares the kernel
families it has once, in :data:`OP_BACKENDS`, and :func:`backend_for` applies it: ``auto`` runs the C++
kernels on CPU tensors and, on CUDA tensors, the op's first GPU family (Triton for most; the compiled
CUDA kernels for the group, scan and Clip-Cov / KL-Cov selection ops). Triton on CPU tensors needs
``TRITON_INTERPRET=1`` (that is how the Triton kernels are tested without a GPU).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Optional

BACKENDS = ("auto", "triton", "cpp", "cuda")

# use_backend's setting, per thread: a block in one thread neither leaks into another thread nor, exiting
# out of order with it, leaves a setting behind (torch.compile reads it and guards on it like a global)
_forced = threading.local()


def _check_name(name: str, source: str = "") -> str:
    """``name`` when it is one of :data:`BACKENDS`, else ``ValueError`` (``source``: where the value came
    from, added to the message)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}{source}")
    return name


def current() -> str:
    """The backend in force: ``use_backend`` first, then FASTALIGN_BACKEND (empty: auto), else auto; an
    unknown FASTALIGN_BACKEND value raises ``ValueError`` naming the variable."""
    name = getattr(_forced, "name", None)
    if name is not None:
        return name
    return _check_name(os.environ.get("FASTALIGN_BACKEND", "auto") or "auto",
                       " (from the FASTALIGN_BACKEND environment variable)")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block, in this thread: ``with fastalign.use_backend("cpp"): ...``."""
    previous = getattr(_forced, "name", None)
    _forced.name = _check_name(name)
    try:
        yield
    finally:
        _forced.name = previous


#: The kernel families of each custom op in ``fastalign/ops``, in the order ``auto`` prefers them:
#:
#: * ``cpp``: the C++ kernels of ``fastalign._C``, on CPU tensors;
#: * ``cuda``: the CUDA kernels of ``fastalign._C`` (when built with nvcc), on CUDA tensors;
#: * ``triton``: the Triton kernels of ``fastalign.kernels``, on CUDA tensors (CPU tensors under
#:   ``TRITON_INTERPRET=1``);
#: * ``torch``: plain torch on the tensors' own device (no host synchronisation): the GPU path of an
#:   op without Triton kernels when its CUDA kernels cannot run.
OP_BACKENDS = {
    "token_stats": ("cpp", "triton", "cuda"),
    "token_stats_backward": ("cpp", "triton", "cuda"),
    "token_stats_backward_": ("cpp", "triton", "cuda"),
    "linear_stats": ("cpp", "triton"),
    "linear_stats_backward": ("cpp", "triton"),
    "policy_loss_rows": ("cpp", "triton"),
    "policy_loss_grads": ("cpp", "torch"),
    "policy_loss_cov_rows": ("cpp",),
    "cov_sums": ("cpp", "cuda", "torch"),
    "cov_select": ("cpp", "cuda", "torch"),
    "group_stats": ("cpp", "cuda", "torch"),
    "group_advantage": ("cpp", "cuda", "torch"),
    "reverse_scan": ("cpp", "cuda", "triton"),
    "divergence_rows": ("cpp", "triton"),
    "token_divergence": ("cpp", "triton"),
    "token_divergence_backward": ("cpp", "triton"),
    "token_divergence_backward_": ("cpp", "triton"),
    "elementwise_divergence": ("cpp", "triton"),
    "elementwise_divergence_backward": ("cpp", "triton"),
    "linear_divergence": ("cpp", "triton"),
    "linear_divergence_backward": ("cpp", "triton"),
}

#: What runs when a backend is requested, best first; an op runs the first of these it has that can run on the
#: tensors' device. ``cuda`` gives way to the Triton kernels, then plain torch, where the CUDA kernels cannot run
#: (or the op has none); ``triton`` to plain torch, then the compiled kernels, where the op has no Triton kernels.
SUBSTITUTES = {"cpp": ("cpp",), "cuda": ("cuda", "triton", "torch"), "triton": ("triton", "torch", "cuda", "cpp")}

#: The families of an op with every kernel family: what the public functions check a request against.
ALL_KERNELS = ("cpp", "triton", "cuda")


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:  # a finder that refuses it
        return False


#: Looked up once, at import: a function that a compiled graph calls reads a constant (torch.compile does
#: not trace ``importlib``).
_TRITON_FOUND = _find_triton()


def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (looked up at import, not imported)."""
    return _TRITON_FOUND


def _runs(family: str, kind: str, device) -> bool:
    """Whether kernels of ``family`` can run on tensors on ``device`` (of type ``kind``)."""
    if family == "cpp":
        return kind == "cpu"
    if family == "cuda":
        return kind == "cuda" and cuda_kernels_usable(device)  # warned once per device when not
    return kind in ("cpu", "cuda") and triton_installed()


def _choose(what: str, families: tuple, device, backend: str | None) -> str:
    name = _check_name(backend) if backend is not None else current()
    kind = device.type
    if name == "cpp" and kind == "cuda":
        raise ValueError("backend 'cpp' runs on CPU tensors only; got CUDA tensors")
    if name == "cuda" and kind != "cuda":
        raise ValueError("backend 'cuda' needs CUDA tensors; got tensors on " + str(device))
    if name == "triton" and not triton_installed():
        raise ValueError("backend 'triton' needs the triton package, which is not installed (pip install triton)")
    for family in families if name == "auto" else SUBSTITUTES[name]:
        if family in families and _runs(family, kind, device):
            break
    else:
        missing = "; triton is not installed" if "triton" in families and not triton_installed() else ""
        raise ValueError(f"{what} has no kernels for tensors on {device} (it has: {', '.join(families)}{missing})")
    if family == "triton" and kind != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)")
    return family


def backend_for(op: str, device, backend: str | None = None) -> str:
    """The kernel family (``OP_BACKENDS``) that runs the custom op ``op`` for tensors on ``device``.

    ``backend``: the request ("auto", "cpp", "triton", "cuda"; None: the setting in force, :func:`current`).
    ``auto`` runs the op's first family that can run on the device; a named backend runs itself or its
    ``SUBSTITUTES``. ``cpp`` on CUDA tensors, ``cuda`` on CPU tensors and Triton kernels on CPU tensors
    without ``TRITON_INTERPRET=1`` raise a ValueError.
    """
    return _choose(op, OP_BACKENDS[op], device, backend)


def resolve(device, backend: str | None = None) -> str:
    """Concrete backend ("triton", "cpp" or "cuda") for tensors on ``device``, for an op with every kernel
    family: what the public functions pass down to the ops (each op then applies :func:`backend_for`)."""
    return _choose("this op", ALL_KERNELS, device, backend)


def request(device, backend: str | None = None) -> str:
    """The backend request in force for tensors on ``device`` (``backend``, else :func:`current`), checked as
    :func:`resolve` checks it: what public functions pass down to ops whose kernel families differ from
    ``ALL_KERNELS`` (group advantages, reverse scans, Clip-Cov / KL-Cov selection), so that each op applies
    ``auto`` (or a named backend's ``SUBSTITUTES``) to its own families, as ``fastalign.info`` reports."""
    resolve(device, backend)
    return _check_name(backend) if backend is not None else current()


def compiled():
    """The compiled core ``fastalign._C`` (C++ CPU kernels, CUDA kernels when built with them)."""
    try:
        from fastalign import _C
    except ImportError as e:
        raise RuntimeError(missing_core(e)) from e
    return _C


def missing_core(error: ImportError, core: Optional[str] = None, package: Optional[str] = None) -> str:
    """Why ``fastalign._C`` did not import, and what to do: a core that is there but does not load, a source
    checkout imported in place of the installed package, or an install without the core. ``core``: the core's
    file, by default the one the import system finds (an editable install keeps it outside the package folder);
    ``package``: the package folder, by default this one."""
    core = core or _core_file()
    package = package or os.path.dirname(os.path.abspath(__file__))
    if core:
        return f"fastalign._C at {core} does not load ({error}): reinstall fastalign for this Python and platform"
    if os.path.exists(os.path.join(os.path.dirname(package), "CMakeLists.txt")):
        return (f"fastalign was imported from the source tree {package}, which has no built fastalign._C "
                f"({error}): run from another folder to use the installed package, or install the checkout "
                "editable (pip install -e .)")
    return f"fastalign._C is missing from {package} ({error}): reinstall fastalign"


def _core_file() -> Optional[str]:
    """The file the import system finds for ``fastalign._C`` (in the package folder, or where an editable
    install put it), None when it finds none."""
    try:
        spec = importlib.util.find_spec("fastalign._C")
    except (ImportError, ValueError):  # ValueError: a None entry in sys.modules
        return None
    return None if spec is None else spec.origin


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


_cuda_usable: dict = {}


def _arch_runs(archs: str, capability: int) -> bool:
    """Whether code built for ``archs`` ("80-real,90-real,100" as CMake lists them) runs on sm_``capability``:
    machine code of the same major and a lower or equal minor version, or PTX of a lower or equal version. An
    architecture-specific target ("90a") runs on its own version only, a family-specific one ("100f") on its major
    version from its minor up (machine code or PTX). The build records what CMake's "all", "all-major" and "native"
    resolve to; a keyword it could not resolve is taken to cover the device (a kernel that cannot run then fails at
    its launch, with CUDA's message); an entry that is not an architecture is passed over."""
    for arch in filter(None, archs.split(",")):
        if arch in ("all", "all-major", "native"):
            return True
        number, _, kind = arch.partition("-")
        specific = number[-1:] if number[-1:] in ("a", "f") else ""
        if not number.rstrip("af").isdigit() or kind not in ("", "real", "virtual"):
            continue
        n = int(number.rstrip("af"))
        same_family = n // 10 == capability // 10 and n <= capability
        if specific == "a" and n == capability or specific == "f" and same_family:
            return True
        if specific:
            continue
        if kind in ("", "real") and same_family or kind in ("", "virtual") and n <= capability:
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
        if error or count == 0:
            reason = (f"the CUDA driver ({driver // 1000}.{driver % 1000 // 10}) cannot run kernels built with "
                      f"CUDA {runtime // 1000}.{runtime % 1000 // 10}: {error or 'no device'}")
        else:
            major, minor = torch.cuda.get_device_capability(index)
            if not _arch_runs(archs, 10 * major + minor):
                reason = f"its CUDA kernels are built for sm_{archs.replace(',', ', sm_')}, not sm_{major}{minor}"
    _cuda_usable[index] = reason is None
    if reason is not None:
        import warnings

        warnings.warn(f"fastalign: {reason}; cuda:{index} runs the Triton kernels instead", RuntimeWarning,
                      stacklevel=3)
    return reason is None
