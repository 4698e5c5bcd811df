"""The gate's table: one row per compiled kernel."""
from __future__ import annotations

from fastalign.aot.sass import Sass

_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def table(results) -> str:
    """One row per compiled kernel. With ``--sass``: instructions in the kernel, barriers, and of its
    largest innermost loop the instructions, barriers and instructions per element loaded."""
    head = ("kernel", "variant", "dtype", "arch", "regs", "spill B", "smem B", "SASS", "BAR", "loop", "loop BAR",
            "instr/elem", "MMA", "status")
    rows = []
    dash = lambda v: str(v) if v is not None and v >= 0 else "-"  # noqa: E731
    for r in results:
        status = ("ok" if not (r.problems or r.error)
                  else "FAIL: " + "; ".join(r.problems + ([r.error] if r.error else [])))
        if r.spill_bytes and not r.problems:
            status = "ok (spills, not bf16/fp16)"
        sa = r.sass or Sass()
        per_elem = "-"
        if sa.loop > 0 and sa.loop_load_bytes and r.dtype in _ELEM_BYTES:
            per_elem = f"{sa.loop / (sa.loop_load_bytes / _ELEM_BYTES[r.dtype]):.1f}"
        rows.append((r.kernel, r.variant, r.dtype, f"sm_{r.arch}", dash(r.registers), str(r.spill_bytes),
                     str(r.smem), dash(sa.total), dash(sa.barriers), dash(sa.loop), dash(sa.loop_barriers), per_elem,
                     sa.mma, status))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])
