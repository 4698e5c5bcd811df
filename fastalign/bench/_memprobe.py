"""``python -m fastalign.bench._memprobe '{"case":..,"mode":..,"impl":..,"compile":..}'``: one step in a fresh
process, prints its peak extra resident memory in bytes (used by the CPU benchmarks).

``compile`` (default true) switches the compiled baselines on or off as ``--no-compile`` does in the
process that times them, so a row's time and memory belong to one configuration. The case's tiny-shape
``warmup`` step runs first (lazy imports, thread pools and first-call dispatch are then not charged to
the step). An implementation that compiles (the warm-up compiled a graph with torch.compile, or it is the
``torch.compile`` baseline) is then run once at the measured shape before the measurement: its first call
at a new shape compiles again, and the peak measured is the compiled step's own, as it runs when timed,
not the compiler's. Other implementations are measured at their first call at that shape.
"""
import json
import sys

import torch

from fastalign.bench import optional
from fastalign.bench.cases import find_case
from fastalign.bench.core import call, measure_cpu_memory_here

#: the implementation name of the torch.compile baselines
COMPILED_IMPL = "torch.compile"


def frames_compiled() -> int:
    """Python frames torch.compile has compiled in this process so far (0 when that count is unavailable)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["frames"]["total"])


def peak_bytes(spec: dict, measure=measure_cpu_memory_here) -> int:
    """``measure`` (peak extra bytes) of the step ``spec`` names, after the warm-ups described above."""
    optional.COMPILE["enabled"] = bool(spec.get("compile", True))
    case = find_case(spec["case"])
    cpu = torch.device("cpu")
    compiled_before = frames_compiled()
    if case.warmup is not None:
        warm = case.warmup(cpu, spec["mode"]).get(spec["impl"])
        if warm is not None:
            call(warm)
        del warm
    compiles = spec["impl"] == COMPILED_IMPL or frames_compiled() > compiled_before
    step = case.build(cpu, spec["mode"])[spec["impl"]]
    if compiles:
        call(step)  # compiles at this shape: not part of the measurement
    return measure(step)


def main() -> None:
    print(peak_bytes(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
