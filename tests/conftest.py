"""Shared test set-up.

Without a GPU the Triton kernels run on CPU tensors in the Triton interpreter
(TRITON_INTERPRET=1, set here before any kernel is imported), so every op is
tested on both its Triton and its C++ kernels. Tests marked ``gpu`` run the
compiled Triton/CUDA kernels: ``pytest -m gpu`` on a machine with CUDA.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

CPU_BACKENDS = ["cpp"] + (["triton"] if HAS_TRITON else [])


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    """Each CPU-runnable backend: the C++ kernels and the Triton interpreter."""
    return request.param


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
