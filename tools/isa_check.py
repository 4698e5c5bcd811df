"""Whether a built fastalign._C really carries AVX2 and AVX-512 kernel code.

Every CPU kernel body is compiled three times (csrc/cpu/isa_dispatch.h): with
AVX-512, with AVX2 + FMA, and for the baseline (SSE2 on x86-64), and the CPU
picks one at run time. The released binary is stripped, so this script counts
over the whole disassembly (``objdump -d``): instructions on 512-bit (zmm)
registers, on 256-bit (ymm) registers, and fused multiply-adds. The baseline
code has none of them; the build-time probes (csrc/cpu/isa_probe.cpp) a
handful; the kernels' AVX2 / AVX-512 variants thousands. A build whose target
attributes had no effect has none at all.

    python tools/isa_check.py [path/to/_C.so]     default: the installed fastalign._C

Exit status 1, with the counts, when on x86-64 any count is below MIN_COUNT.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys

# Far above the probes' few instructions, far below what the kernel variants compile to.
MIN_COUNT = 1000
_FMA = ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub")


def vector_counts(so_path: str) -> dict:
    """{"instructions", "zmm", "ymm", "fma"}: counts over the disassembly of so_path."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise FileNotFoundError("objdump (binutils) is needed to disassemble the extension")
    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", so_path], capture_output=True, text=True, check=True)
    counts = {"instructions": 0, "zmm": 0, "ymm": 0, "fma": 0}
    for line in proc.stdout.splitlines():
        parts = line.split("\t", 1)
        if len(parts) != 2 or not parts[0].rstrip().endswith(":"):
            continue
        insn = parts[1].lstrip()
        counts["instructions"] += 1
        counts["zmm"] += "%zmm" in insn
        counts["ymm"] += "%ymm" in insn
        counts["fma"] += insn.startswith(_FMA)
    return counts


def problems(counts: dict) -> list:
    """Why the counts show no real AVX2 / AVX-512 kernels (empty when they do)."""
    out = []
    for key, what in (("zmm", "AVX-512 (zmm)"), ("ymm", "AVX2 (ymm)"), ("fma", "FMA")):
        if counts[key] < MIN_COUNT:
            out.append(f"{counts[key]} {what} instructions (expected at least {MIN_COUNT}): "
                       "the kernel variants were compiled for the baseline")
    return out


def main(argv) -> int:
    if argv:
        so_path = argv[0]
    else:
        from fastalign import _C

        so_path = _C.__file__
    if platform.machine() not in ("x86_64", "AMD64"):
        print(f"{platform.machine()}: every kernel variant is the baseline, nothing to check")
        return 0
    c = vector_counts(so_path)
    print(f"{so_path}: {c['instructions']} instructions, zmm {c['zmm']}, ymm {c['ymm']}, fma {c['fma']}")
    bad = problems(c)
    for p in bad:
        print("FAIL:", p)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
