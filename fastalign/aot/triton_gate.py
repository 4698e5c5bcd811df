"""The Triton kernels: every family's launches captured per architecture and compiled with Triton's ptxas
(:func:`run_triton`); the architectures the installed Triton targets (:func:`supported_archs`)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
import shutil
import tempfile
from pathlib import Path

from fastalign.aot.capture import capturing
from fastalign.aot.cases import FAMILIES, _torch_dtype
from fastalign.aot.result import Result
from fastalign.aot.sass import Sass, _cuobjdump, sass_stats
from fastalign.aot.workers import usable_cores

_REG = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_triton(fn, signature, constexprs, attrs, options, arch, tmp, tool, sass):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs = triton.knobs
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=options.__dict__)
    text = log.getvalue()
    regs = [int(x) for x in _REG.findall(text)]
    spills = sum(int(a) + int(b) for a, b in _SPILL.findall(text))
    counts = sass_stats(kernel.asm["cubin"], tmp, tool) if sass else Sass()
    return (max(regs) if regs else -1), spills, int(kernel.metadata.shared), counts


#: The compile jobs of :func:`run_triton`, ``(fn, signature, constexprs, attrs, options, arch, sass, tmp)``: set
#: before its worker processes fork, which read them by index.
_JOBS: list = []


def _compile_job(index: int):
    """``(index, (registers, spill bytes, shared memory, Sass) or None, error or None)`` of compile job ``index``,
    its cubin dumped in a directory of this process's own (``tmp/<pid>``)."""
    fn, signature, constexprs, attrs, options, arch, sass, tmp = _JOBS[index]
    own = tmp / str(os.getpid())
    own.mkdir(exist_ok=True)
    try:
        return index, compile_triton(fn, signature, constexprs, attrs, options, arch, own, _cuobjdump(), sass), None
    except Exception as e:
        lines = str(e).strip().splitlines() or [""]
        where = f"{lines[0]} " if len(lines) > 1 else ""  # "at line:col:" of a CompilationError
        return index, None, f"{type(e).__name__}: {where}{lines[-1][:200]}"


def run_triton(archs, sass, only=None, jobs=None) -> list[Result]:
    """Every family's launches captured (in order) for each architecture, then each distinct specialisation
    compiled, ``jobs`` at a time (worker processes forked from this one; default :func:`usable_cores`)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="fastalign-aot-cache-")
    triton.knobs.compilation.always_compile = True
    results = []
    seen = set()  # a specialisation that several cases launch is compiled (and listed) once, for the first
    tmp = Path(tempfile.mkdtemp(prefix="fastalign-aot-"))
    _JOBS.clear()
    try:
        for arch in archs:
            for family, cases, dtypes in FAMILIES:
                if only and only not in family:
                    continue
                for dname in dtypes:
                    if arch >= 100 and dname == "fp16":  # the bf16 code path; sm_80 / sm_90 compile it
                        continue
                    for variant, launch in cases(_torch_dtype(dname)):
                        with capturing(arch) as calls:
                            try:
                                launch()
                            except Exception as e:  # a launcher that cannot even specialise
                                results.append(Result(family, variant, arch, dname, error=f"launcher: {e!r}"))
                                continue
                        for fn, signature, constexprs, attrs, options in calls:
                            key = (fn, dname, repr(signature), repr(constexprs), repr(attrs), repr(options))
                            if key in seen:
                                continue
                            seen.add(key)
                            results.append(Result(fn.__name__, variant, arch, dname))
                            _JOBS.append((fn, signature, constexprs, attrs, options, arch, sass, tmp))
        compiled = [r for r in results if not r.error]  # in the order of _JOBS (not the launchers' errors)
        width = max(1, min(len(_JOBS), jobs or usable_cores()))
        with contextlib.ExitStack() as stack:
            if width == 1:
                outcomes = map(_compile_job, range(len(_JOBS)))
            else:  # forked: the workers inherit _JOBS, the captured kernels included; a worker that dies (a
                # crashed ptxas, the OOM killer) raises BrokenProcessPool here rather than leaving its job waited for
                pool = concurrent.futures.ProcessPoolExecutor(width, mp_context=multiprocessing.get_context("fork"))
                stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # an error, Ctrl-C: the queue dropped
                outcomes = pool.map(_compile_job, range(len(_JOBS)))
            for index, stats, error in outcomes:
                r = compiled[index]
                if error is None:
                    r.registers, r.spill_bytes, r.smem, r.sass = stats
                r.error = error or ""
    finally:
        _JOBS.clear()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(triton.knobs.cache.dir, ignore_errors=True)
    return results


def _probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    return probe


def supported_archs(requested):
    """The requested architectures the installed Triton compiles for (a probe kernel compiles)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    probe = _probe_kernel()
    out = []
    for a in requested:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                triton.compile(ASTSource(probe, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {(1,): 64}),
                               target=GPUTarget("cuda", a, 32))
        except Exception:
            continue
        out.append(a)
    return out
