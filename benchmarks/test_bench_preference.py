"""LinearPreferenceLoss (sigmoid DPO with a reference, from hidden states) vs the paths that build logits.

    pytest benchmarks/test_bench_preference.py --benchmark-only                # quick shape, every impl
    pytest benchmarks/test_bench_preference.py --benchmark-only --bench-full   # + the target CPU shape
    python benchmarks/test_bench_preference.py [--full]                        # prints + writes results JSON

The target shape (CPU, B=8 pairs, T=512, H=1024, V=152064 fp32, forward+backward; a quarter
of each row is prompt and the responses are ragged, so about half the positions are labelled)
compares ``fastalign`` (labelled rows only) and ``fastalign-whole`` (every row) with ``logits`` (fp32 logits + the fused row kernel, the leanest path that
builds them); the log_softmax ``eager`` path needs ~4 N·V·4 bytes (≈20 GB there) and is left
out where the machine lacks the memory. Peak extra memory is measured in a fresh subprocess
per implementation; no timing assertions here.
"""
import json
import os
import sys
import time

import pytest
import torch

from fastalign.bench.cases.preference import cases
from fastalign.bench.core import environment, measure_cpu_memory_subprocess

QUICK, FULL = cases()
IMPLS = ("fastalign", "fastalign-whole", "logits", "eager", "torch.compile")


@pytest.mark.parametrize("impl", IMPLS)
def test_quick(benchmark, impl):
    step = QUICK.build(torch.device("cpu"), "fwd+bwd")[impl]
    if step is None:
        pytest.skip(f"{impl} unavailable")
    benchmark.group = QUICK.key
    benchmark.pedantic(step, warmup_rounds=1, rounds=3, iterations=1)


def measure_full(impls=("logits", "fastalign", "fastalign-whole"), rounds=1):
    """Median step time (inputs built once, one warm-up-free round each by default) and peak memory."""
    out = {"case": FULL.key, "mode": "fwd+bwd", "env": environment(torch.device("cpu")), "impls": {}}
    steps = FULL.build(torch.device("cpu"), "fwd+bwd")
    for impl in impls:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            steps[impl]()
            times.append(time.perf_counter() - t0)
        out["impls"][impl] = {"time_s": sorted(times)[len(times) // 2]}
    del steps
    for impl in impls:
        out["impls"][impl]["peak_extra_bytes"] = measure_cpu_memory_subprocess(FULL, "fwd+bwd", impl, timeout=3600)
    b = out["impls"]["logits"]
    for impl in impls:
        if impl == "logits":
            continue
        f = out["impls"][impl]
        f["time_ratio_vs_logits"] = f["time_s"] / b["time_s"]
        if f["peak_extra_bytes"] and b["peak_extra_bytes"]:
            f["memory_ratio_vs_logits"] = f["peak_extra_bytes"] / b["peak_extra_bytes"]
    return out


def test_full_shape(request):
    if not request.config.getoption("--bench-full"):
        pytest.skip("the target shape runs with --bench-full (minutes per step on a small CPU)")
    res = measure_full()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    res = measure_full(rounds=int(os.environ.get("ROUNDS", "1")))
    print(json.dumps(res, indent=1))
    path = os.path.join(os.path.dirname(__file__), "results", "preference_cpu.json")
    if "--write" in sys.argv:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)
