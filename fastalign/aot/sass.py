"""SASS statistics of a cubin from ``cuobjdump --dump-sass``: instructions, barriers, the streaming loop,
its global-load bytes and the tensor-core instruction (:class:`Sass`)."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def _cuobjdump() -> str | None:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.exists() else shutil.which("cuobjdump")


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LDG_BYTES = {"": 4, ".64": 8, ".128": 16, ".U16": 2, ".S16": 2, ".U8": 1}


@dataclass
class Sass:
    total: int = -1      # instructions in the kernel (NOPs excluded)
    barriers: int = -1   # block barriers (BAR.SYNC) in the kernel
    loop: int = -1       # instructions in the largest innermost loop
    loop_barriers: int = -1
    loop_load_bytes: int = 0  # bytes one thread loads from global memory per loop trip
    mma: str = "-"       # tensor-core instruction used (HGMMA: Hopper warpgroup MMA; HMMA: mma.sync)


def _dump_sass(cubin: bytes, tmp: Path, tool: str) -> str:
    path = tmp / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run([tool, "--dump-sass", str(path)], capture_output=True, text=True).stdout


def sass_stats(cubin: bytes, tmp: Path, tool: str | None) -> Sass:
    """Instruction counts from the SASS of a one-kernel cubin (cuobjdump)."""
    if tool is None:
        return Sass()
    return _stats_of(_dump_sass(cubin, tmp, tool))


def sass_stats_per_function(cubin: bytes, tmp: Path, tool: str) -> dict:
    """{mangled kernel name: Sass} for a cubin holding several kernels."""
    out = {}
    for part in re.split(r"(?=\n\s+Function : )", _dump_sass(cubin, tmp, tool)):
        m = re.search(r"Function : (\S+)", part)
        if m:
            out[m.group(1)] = _stats_of(part)
    return out


def _stats_of(out: str) -> Sass:
    """A loop is the range of a backward branch; the reported loop is the largest innermost one."""
    instr = []
    for ln in out.splitlines():
        m = _SASS_LINE.match(ln)
        if m and not m.group(2).strip().startswith("NOP"):
            instr.append((int(m.group(1), 16), m.group(2).strip()))
    is_bar = lambda op: re.search(r"\bBAR\.SYNC|\bBAR\s", op + " ") is not None and "ARV" not in op  # noqa: E731
    loops = []
    for addr, op in instr:
        br = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x)([0-9a-f]+)?", op)
        if br and br.group(1) and int(br.group(1), 16) < addr:
            loops.append((int(br.group(1), 16), addr))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a < b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    st = Sass(total=len(instr), barriers=sum(1 for _, op in instr if is_bar(op)))
    def mnemonic(op):
        words = op.split()
        return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]

    used = {mnemonic(op) for _, op in instr if op}
    for kind in ("UTCHMMA", "UTCQMMA", "UTCMMA", "HGMMA", "HMMA", "IMMA"):  # UTC*: Blackwell tcgen05
        if kind in used:
            st.mma = kind
            break
    def load_bytes(body):
        total = 0
        for op in body:
            m = re.search(r"\bLDG\.E((?:\.64|\.128|\.U16|\.S16|\.U8)?)", op)
            if m:
                total += _LDG_BYTES.get(m.group(1), 4)
        return total

    # the streaming loop: the innermost loop loading the most bytes from global memory per trip
    # (else the largest innermost loop: tile loops load through shared memory)
    best = None
    for lo, hi in innermost:
        body = [op for a, op in instr if lo <= a <= hi]
        key = (load_bytes(body), len(body))
        if best is None or key > best[0]:
            best = (key, body)
    if best is not None:
        body = best[1]
        st.loop = len(body)
        st.loop_barriers = sum(1 for op in body if is_bar(op))
        st.loop_load_bytes = load_bytes(body)
    return st
