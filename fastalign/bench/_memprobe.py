"""``python -m fastalign.bench._memprobe '{"case":..,"mode":..,"impl":..}'``: one step in a fresh
process, prints its peak extra resident memory in bytes (used by the CPU benchmarks)."""
import json
import sys

import torch

from fastalign.bench.cases import find_case
from fastalign.bench.core import measure_cpu_memory_here


def main() -> None:
    spec = json.loads(sys.argv[1])
    case = find_case(spec["case"])
    cpu = torch.device("cpu")
    if case.warmup is not None:
        warm = case.warmup(cpu, spec["mode"]).get(spec["impl"])
        if warm is not None:
            warm()
        del warm
    step = case.build(cpu, spec["mode"])[spec["impl"]]
    print(measure_cpu_memory_here(step))


if __name__ == "__main__":
    main()
