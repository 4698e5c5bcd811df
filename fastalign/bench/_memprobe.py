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
    step = case.build(torch.device("cpu"), spec["mode"])[spec["impl"]]
    print(measure_cpu_memory_here(step))


if __name__ == "__main__":
    main()
