"""The CUDA C++ kernels: each ``csrc/cuda/*.cu`` compiled by nvcc with ``-Xptxas -v`` and its log parsed
per kernel (:func:`run_nvcc`); the architectures the installed nvcc targets (:func:`nvcc_archs`)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from fastalign.aot.result import Result
from fastalign.aot.sass import _cuobjdump, sass_stats_per_function
from fastalign.aot.workers import usable_cores

_NV_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_NV_USED = re.compile(r"Used (\d+) registers")
_NV_SMEM = re.compile(r"(\d+) bytes smem")
_NV_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_DTYPE_OF = (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("double", "fp64"), ("float", "fp32"))


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str):
    """(kernel, dtype) from a demangled CUDA kernel name."""
    base = re.sub(r"^void\s+", "", name.replace("(anonymous namespace)", "").split("(")[0].strip())
    kernel = re.sub(r"<.*$", "", base).split("::")[-1]
    targs = base[len(re.sub(r"<.*$", "", base)):]
    dtype = next((d for key, d in _DTYPE_OF if key in targs), "")
    return kernel, dtype


def run_nvcc(archs, root: Path, sass: bool, only=None) -> tuple[list[Result], str]:
    """Device code of each csrc/cuda/*.cu (with ``only``: those whose file name contains it) compiled to a
    cubin per architecture (no host compile), ptxas -v parsed per kernel, SASS counted per kernel with ``sass``."""
    nvcc = shutil.which("nvcc")
    sources = sorted((root / "csrc" / "cuda").glob("*.cu"))
    if nvcc is None:
        return [], "nvcc not found: the CUDA C++ kernels were not compiled (install the CUDA toolkit to check them)"
    if not sources:
        return [], "no csrc/cuda/*.cu sources found next to the package (installed from a wheel?)"
    sources = [src for src in sources if not only or only in src.name]
    if not sources:
        return [], f"no csrc/cuda/*.cu source has {only!r} in its name: nvcc compiled nothing"
    import pybind11

    inc = ["-I", str(root / "csrc"), "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]
    tool = _cuobjdump() if sass else None
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="fastalign-aot-nvcc-"))
    jobs = [(src, a) for src in sources for a in archs]
    width = max(1, min(len(jobs), usable_cores()))
    try:
        for i in range(0, len(jobs), width):
            procs = []
            for src, arch in jobs[i:i + width]:
                cubin = tmp / f"{src.stem}.sm_{arch}.cubin"
                cmd = [nvcc, "--cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v",
                       f"-arch=sm_{arch}", *inc, "-DFASTALIGN_WITH_CUDA=1", str(src), "-o", str(cubin)]
                procs.append((src, arch, cubin, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                                 stderr=subprocess.STDOUT, text=True)))
            for src, arch, cubin, p in procs:
                out, _ = p.communicate()
                if p.returncode != 0:
                    errors = [ln for ln in out.splitlines() if "error" in ln] or out.strip().splitlines() or ["failed"]
                    results.append(Result(src.name, "nvcc", arch, error=errors[0][:200]))
                    continue
                per_kernel = sass_stats_per_function(cubin.read_bytes(), tmp, tool) if tool else {}
                entries = []
                for b in re.split(r"(?=ptxas info\s+: Compiling entry function)", out):
                    m = _NV_ENTRY.search(b)
                    if not m:
                        continue
                    used, smem, spill = _NV_USED.search(b), _NV_SMEM.search(b), _NV_SPILL.search(b)
                    entries.append((m.group(1), int(used.group(1)) if used else -1, int(smem.group(1)) if smem else 0,
                                    (int(spill.group(2)) + int(spill.group(3))) if spill else 0))
                names = _demangle([e[0] for e in entries])
                for (mangled, regs, smem, spills), name in zip(entries, names):
                    kernel, dtype = _short(name)
                    variant = "nvcc full" if ", true>" in name else "nvcc lean" if ", false>" in name else "nvcc"
                    results.append(Result(f"{src.stem}.cu:{kernel}", variant, arch, dtype, regs, spills, smem,
                                          sass=per_kernel.get(mangled)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results, ""


def nvcc_archs(requested):
    """The requested architectures the installed nvcc targets (all of them without nvcc: its compile reports that
    it is missing)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return requested
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    return [a for a in requested if f"compute_{a}" in listed]
