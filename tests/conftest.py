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

try:  # property tests: a bounded, reproducible default profile; HYPOTHESIS_PROFILE=slow for more examples
    from hypothesis import HealthCheck, settings

    _QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("default", max_examples=12, deadline=None, derandomize=True, database=None,
                              suppress_health_check=_QUIET, print_blob=True)
    settings.register_profile("slow", max_examples=300, deadline=None, suppress_health_check=_QUIET,
                              print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass


def _major_minor(version: str) -> tuple:
    return tuple(int(part) for part in version.split(".")[:2])


def pytest_configure(config):
    # a former argument name used by the library or by a test is an error, except under pytest.warns
    config.addinivalue_line("filterwarnings", "error::fastalign._deprecate.RenamedWarning")
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        import numpy

        # the interpreter of Triton 3.6 and older turns 1-element arrays into loop bounds, which
        # NumPy 2.4 made an error: every Triton test would fail with the same TypeError
        if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
            raise pytest.UsageError(
                f"the Triton {triton.__version__} interpreter cannot run with NumPy {numpy.__version__} "
                "('only 0-dimensional arrays can be converted to Python scalars'): install 'numpy<2.4' "
                "or Triton 3.7 or newer")


@pytest.fixture(autouse=True)
def _seeded_draws():
    """Each test starts from the same global RNG state: its unseeded draws do not depend on which tests ran
    before it (a tolerance met in one order and not in another)."""
    torch.manual_seed(0)


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
