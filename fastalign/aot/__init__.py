"""Ahead-of-time compile gate for the GPU kernels; needs no GPU.

    python -m fastalign.aot [--arch 80,90,100] [--no-nvcc] [--sass] [--only NAME] [--jobs N]

Every Triton kernel is compiled through its real launcher: the launchers run on
``meta`` tensors at realistic shapes (N = 8192 tokens, V = 151936, H = 4096 in
bf16, fp16 and fp32) while Triton's own argument binder specialises the call
exactly as a launch would; instead of launching, the specialisation (signature,
constexprs, alignment attributes, num_warps, num_stages) is recorded and then
compiled with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``, which
runs the ptxas that ships with Triton. Each compiled kernel is checked:

* it compiles (an error fails the gate);
* no register spills in bf16/fp16 variants (fp32 spills are reported);
* its shared memory fits the per-block limit of the architecture.

Then each ``csrc/cuda/*.cu`` is compiled by nvcc with ``-Xptxas -v`` for the
same architectures and checked the same way (skipped, with a message, when nvcc
is absent). A table (kernel, variant, arch, registers, spills, shared memory,
SASS instructions, barriers) is printed, one row per distinct specialisation (several cases may launch
the same one: it is listed under the first). Nothing is cached across runs: Triton's
cache goes to a fresh temporary directory and every kernel is compiled again, on every usable CPU core
(``--jobs``).
Exit status 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

# A name is looked up in the module that uses it: to replace one (a test's monkeypatch), patch it there, e.g.
# fastalign.aot.cli.run_triton for main, fastalign.aot.triton_gate.FAMILIES for run_triton.
from fastalign.aot.capture import capturing
from fastalign.aot.cases import FAMILIES, _torch_dtype  # noqa: F401
from fastalign.aot.cli import main
from fastalign.aot.nvcc_gate import _NV_ENTRY, _NV_SMEM, _NV_SPILL, _NV_USED, _short, nvcc_archs, run_nvcc  # noqa: F401
from fastalign.aot.report import table
from fastalign.aot.result import SMEM_LIMIT, Result, check
from fastalign.aot.sass import Sass, _stats_of  # noqa: F401
from fastalign.aot.triton_gate import compile_triton, run_triton, supported_archs

__all__ = ["FAMILIES", "SMEM_LIMIT", "Result", "Sass", "capturing", "check", "compile_triton", "main", "nvcc_archs",
           "run_nvcc", "run_triton", "supported_archs", "table"]
