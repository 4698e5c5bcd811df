"""Benchmark machinery: cases, timing, peak memory, device limits.

A :class:`Case` builds its inputs once and returns, per implementation name,
a zero-argument step (one forward, or one forward+backward). Every step is
timed in the same process after warm-up (median of repeats); peak extra
memory is the CUDA allocator's peak on GPU and, on CPU, the peak resident set
of a fresh subprocess that builds the inputs and runs the step once.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import torch

Step = Callable[[], object]
BASELINE = "eager"


@dataclasses.dataclass
class Case:
    op: str                      # public op name, e.g. "token_logprobs"
    label: str                   # short shape label, e.g. "4096x32000 fp32"
    params: dict                 # numbers for JSON / plots (tokens, vocab, ...)
    build: Callable[[torch.device, str], Dict[str, Optional[Step]]]  # (device, mode) -> impl -> step
    modes: tuple = ("fwd", "fwd+bwd")
    quick: bool = True           # part of --quick
    bytes_moved: Optional[Callable[[str], int]] = None   # minimal HBM traffic of a mode (GB/s column)
    flops: Optional[Callable[[str], int]] = None         # useful FLOPs of a mode (TFLOP/s column)
    # bytes every implementation must allocate in a mode (the gradients it returns); memory ratios
    # are taken on the peak beyond these
    required_bytes: Optional[Callable[[str], int]] = None
    baseline: str = BASELINE     # the implementation ratios are taken against
    impls: tuple = ("fastalign", "eager", "torch.compile")  # the names ``build`` returns
    devices: tuple = ("cpu", "cuda")
    # the same build at a tiny shape: run once before a memory measurement so one-time process
    # costs (lazy imports, thread pools, first-call dispatch) are not charged to the step
    warmup: Optional[Callable[[torch.device, str], Dict[str, Optional[Step]]]] = None

    @property
    def key(self) -> str:
        return f"{self.op}/{self.label}"


def grad_step(fn: Optional[Callable], leaves, backward: bool, loss: Optional[Callable] = None) -> Optional[Step]:
    """A step running ``fn(*leaves)`` on fresh leaf copies; with ``backward`` also differentiates
    ``loss(output)`` (the output itself by default) with respect to them. None when ``fn`` is."""
    if fn is None:
        return None

    def step():
        xs = [t.detach().requires_grad_(backward) for t in leaves]
        with torch.set_grad_enabled(backward):
            out = fn(*xs)
            if backward:
                (out if loss is None else loss(out)).backward()
        return out
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Step, device: torch.device, repeats: int, budget_s: float) -> dict:
    """Median wall time in ms after one warm-up.

    At least `repeats` runs unless `budget_s` is spent first (never fewer than 2, or 1 when
    the warm-up alone outlasts the budget);
    fast steps keep running for up to a second (at most 1000 runs) so the median is stable.
    """
    t0 = time.perf_counter()
    step()
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - start
        if len(times) >= 2 and elapsed > budget_s:
            break
        if warm_s > budget_s:  # a step longer than the whole budget: one timed run after warm-up
            break
        if len(times) >= repeats and (elapsed > min(budget_s, 1.0) or len(times) >= 1000):
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_cpu_memory_here(step: Step) -> int:
    """Peak RSS growth (bytes) while running `step` once, in this process.

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) so
    input construction does not count; only meaningful in a fresh process.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    step()
    return max(_status_kib("VmHWM") - base, 0) * 1024


def measure_cuda_memory(step: Step, device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


#: glibc keeps freed blocks below a moving threshold mapped; a fixed threshold returns every block
#: of 128 KiB or more to the system when freed, so the resident peak follows what is allocated (as
#: the CUDA allocator's ``max_memory_allocated`` does) instead of what malloc happens to cache.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure_cpu_memory_subprocess(case: Case, mode: str, impl: str, timeout: float = 600) -> Optional[int]:
    """Run one step of (case, mode, impl) in a fresh interpreter and return its peak extra bytes.

    The interpreter first runs the case's tiny-shape ``warmup`` step when the case has one."""
    spec = json.dumps({"case": case.key, "mode": mode, "impl": impl})
    env = {**os.environ, **MALLOC_ENV}
    out = subprocess.run([sys.executable, "-m", "fastalign.bench._memprobe", spec], capture_output=True,
                         text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        sys.stderr.write(f"memory probe failed for {case.key} {mode} {impl}:\n{out.stderr[-2000:]}\n")
        return None
    return int(out.stdout.strip().splitlines()[-1])


def device_limits(device: torch.device) -> dict:
    """Measured peaks to read results against: copy bandwidth and bf16 matmul throughput (CUDA only)."""
    if device.type != "cuda":
        return {}
    n = 1 << 28  # 1 GiB of fp32
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    copy = time_step(lambda: dst.copy_(src), device, 10, 5.0)["min_ms"]
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    mm = time_step(lambda: a @ b, device, 10, 5.0)["min_ms"]
    return {"copy_GBps": 2 * n * 4 / copy / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm / 1e9}


def environment(device: torch.device) -> dict:
    import datetime
    import platform

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["fastalign-bench"] + sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import fastalign

    info["fastalign"] = fastalign.__version__
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                     platform.processor())
        info["device"] = f"CPU {model}, {os.cpu_count()} cores"
        info["cpu_threads"] = torch.get_num_threads()
    return info
