"""``python -m fastalign.aot``: options, the compiles, the checks, the table and the exit status."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from fastalign.aot.cases import FAMILIES
from fastalign.aot.nvcc_gate import nvcc_archs, run_nvcc
from fastalign.aot.report import table
from fastalign.aot.result import SMEM_LIMIT, check
from fastalign.aot.triton_gate import run_triton, supported_archs


def _archs(text: str) -> list:
    """``--arch``: comma-separated compute capabilities, e.g. ``80,90,100``."""
    items = [a.strip() for a in text.split(",") if a.strip()]
    if not items or not all(a.isdigit() for a in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated compute capabilities such as 80,90,100, "
                                         f"got {text!r}")
    return list(dict.fromkeys(int(a) for a in items))


def main(argv=None) -> int:
    # set before any kernel compiles (the architecture probe included): Triton warns when it is unset
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    summary = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package docstring, the user doc
    p = argparse.ArgumentParser(prog="python -m fastalign.aot", description=summary)
    p.add_argument("--arch", default=_archs("80,90,100"), type=_archs,
                   help="comma-separated compute capabilities (default 80,90,100; those the installed Triton's "
                        "ptxas cannot target are left out with a note)")
    p.add_argument("--no-nvcc", action="store_true", help="skip the csrc/cuda/*.cu compile")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--sass", action="store_true", help="count SASS instructions and barriers (cuobjdump)")
    p.add_argument("--only", default=None, metavar="NAME",
                   help="only the Triton kernel families and the csrc/cuda/*.cu files whose name contains NAME")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="Triton compiles run at once, in worker processes (default: the usable CPU cores)")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.no_triton and args.no_nvcc:
        p.error("--no-triton and --no-nvcc together leave nothing to compile")
    if not args.no_triton and importlib.util.find_spec("triton") is None:
        p.error("the Triton kernels need the triton package (pip install triton), or pass --no-triton")
    requested = args.arch
    t0 = time.time()
    results, notes = [], []
    compiled = set()  # the architectures some compiler targeted
    if not args.no_triton:
        archs = supported_archs(requested)
        for a in sorted(set(requested) - set(archs)):
            notes.append(f"sm_{a}: not supported by the installed Triton's ptxas; its Triton kernels not compiled")
        results += run_triton(archs, args.sass, args.only, jobs=args.jobs)
        compiled.update(archs)
    if not args.no_nvcc:
        root = Path(__file__).resolve().parents[2]
        archs = nvcc_archs(requested)
        for a in sorted(set(requested) - set(archs)):
            notes.append(f"sm_{a}: not a target of the installed nvcc; the CUDA sources not compiled for it")
        if archs:
            nv, note = run_nvcc(archs, root, args.sass, args.only)
            results += nv
            if note:
                notes.append(note)
        compiled.update(archs)
    for a in sorted(set(requested) - set(SMEM_LIMIT)):
        notes.append(f"sm_{a}: no per-block shared memory limit known here; shared memory not checked for it")
    for r in results:
        check(r)
    print(table(results))
    for n in notes:
        print("note:", n)
    bad = [r for r in results if r.problems]
    if not results:
        cuda_sources = (Path(__file__).resolve().parents[2] / "csrc" / "cuda").glob("*.cu")
        unmatched = args.only and not any(args.only in f for f, _, _ in FAMILIES) and \
            not any(args.only in src.name for src in cuda_sources)
        why = (f"no Triton kernel family ({', '.join(f for f, _, _ in FAMILIES)}) or csrc/cuda/*.cu file name "
               f"contains --only {args.only!r}" if unmatched else "no kernel was compiled (see the notes above)")
        print(f"\nAOT gate: {why}; failing")
        return 1
    print(f"\nAOT gate: {len(results)} kernel compilations for sm_{', sm_'.join(map(str, sorted(compiled)))} "
          f"in {time.time() - t0:.0f} s; {len(bad)} failing")
    return 1 if bad else 0
