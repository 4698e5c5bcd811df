"""One compiled kernel's numbers (:class:`Result`) and the gate's checks on them (:func:`check`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastalign.aot.sass import Sass

#: Largest shared memory one block may use (opt-in), bytes.
SMEM_LIMIT = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
              90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024}


@dataclass
class Result:
    kernel: str
    variant: str
    arch: int
    dtype: str = ""
    registers: int = -1
    spill_bytes: int = 0
    smem: int = 0
    sass: "Sass" = None
    error: str = ""
    problems: list = field(default_factory=list)


def check(r: Result):
    low_precision = r.dtype in ("bf16", "fp16")
    if r.error:
        r.problems.append("compile error")
    if r.spill_bytes and low_precision:
        r.problems.append(f"{r.spill_bytes} bytes of register spills")
    limit = SMEM_LIMIT.get(r.arch)
    if limit is not None and r.smem > limit:
        r.problems.append(f"shared memory {r.smem} > {limit}")
