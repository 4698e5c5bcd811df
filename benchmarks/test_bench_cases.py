"""Every fastalign-bench case and implementation as a pytest-benchmark test; compare
rows of one case (``--benchmark-group-by=param:case``) to read the ratios to its baseline."""
import pytest
import torch

from fastalign.bench.cases import all_cases
from fastalign.bench.core import sync


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    full = metafunc.config.getoption("--bench-full")
    dev = metafunc.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    params = [pytest.param(c, m, impl, id=f"{c.op}-{c.label.replace(' ', '_')}-{m}-{impl}")
              for c in all_cases() if (c.quick or full) and dev in c.devices for m in c.modes for impl in c.impls]
    metafunc.parametrize("case,mode,impl", params)


@pytest.fixture
def device(request):
    name = request.config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def test_case(benchmark, case, mode, impl, device):
    step = case.build(device, mode).get(impl)
    if step is None:
        pytest.skip(f"{impl} not available for {case.key}")
    benchmark.group = f"{case.key} {mode}"

    def run():
        step()
        sync(device)

    benchmark.pedantic(run, warmup_rounds=1, rounds=3, iterations=1)
