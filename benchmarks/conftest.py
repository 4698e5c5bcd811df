"""pytest-benchmark suite: the same cases as ``fastalign-bench``.

    pytest benchmarks/ --benchmark-only                 # quick cases, CPU or CUDA
    pytest benchmarks/ --benchmark-only --bench-full    # every case
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:case
"""


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", help="run the full (not only quick) cases")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
