"""Benchmark machinery: cases, timing, peak memory, device limits.

A :class:`Case` builds its inputs once and returns, per implementation name,
a zero-argument step (one forward, or one forward+backward). Every step is
timed in the same process after warm-up, the candidates' repetitions interleaved
(median and interquartile range of repeats); peak extra
memory is the CUDA allocator's peak on GPU and, on CPU, the peak resident set
of a fresh subprocess that builds the inputs and runs the step once. A step that
compiles (torch.compile, or a library compiling its own code) is measured at a
call after its first one at the measured shape, as it is timed: the peak is the
step's, never the compiler's (see :mod:`fastalign.bench._memprobe`).

A step may carry ``before`` / ``after`` attributes: callables run around each of
its calls (warm-up, timed runs, memory measurement), outside what is timed or
measured, e.g. to switch load beside it on and off (:func:`hooks`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, Optional
from unittest import mock

import torch

from fastalign.bench import optional

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


def random_head(g: torch.Generator, rows: tuple, H: int, V: int, dtype: torch.dtype) -> tuple:
    """``(hidden [*rows, H], weight [V, H])`` drawn from ``g`` in ``dtype``: unit hidden states and a weight of
    scale ``H^-1/2``, so the logits have unit scale as a trained head's do."""
    device = g.device
    hidden = torch.randn(*rows, H, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(V, H, device=device, generator=g) * H ** -0.5).to(dtype)
    return hidden, weight


#: (tokens, student hidden, vocabulary, dtype, quick) of the student-teacher cases (the teacher 1.5x wider)
STUDENT_TEACHER_SHAPES = [(512, 512, 32000, "fp32", True), (2048, 1024, 32000, "fp32", False),
                          (8192, 4096, 151936, "bf16", False)]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def student_teacher_cases(op: str, make_build: Callable, impls: tuple, backward_products: int, backward: str,
                          label: str = "", params: Optional[dict] = None, warmup_options: Optional[dict] = None,
                          support: Optional[int] = None):
    """The cases of a loss between a student's head and a wider teacher's over :data:`STUDENT_TEACHER_SHAPES`,
    an eighth of the tokens unscored: ``make_build(N, H, H_t, V, dtype, **options)`` builds the steps;
    ``backward_products`` is the backward's ``n x H x V`` products (of two FLOPs each) past the forward's logits,
    ``backward`` what they are. ``support``: the loss reads ``support`` logits per token past the student's top-k
    selection (the teacher's are ``support`` dot products per token, and the backward's products run over
    ``support`` rows of the head instead of ``V``)."""
    out = []
    for N, H, V, dt, quick in STUDENT_TEACHER_SHAPES:
        Ht, dtype = H * 3 // 2, _DTYPES[dt]
        elem = torch.empty((), dtype=dtype).element_size()
        n = N - N // 8
        read = V if support is None else support  # the logits per token the loss reads, past the selection
        f = 2 * n * (H * V + Ht * read)  # the student's logits, the teacher's at what the loss reads
        width = "V" if support is None else "k"
        model = (f"fwd 2*n*(H*V+H_t*{width}) = {f / 1e12:.2f} TFLOP over the n = 7N/8 scored tokens; fwd+bwd "
                 f"adds {2 * backward_products}*n*H*{width} ({backward})")
        teacher_rows = V if support is None else min(V, n * support)
        out.append(Case(
            op=op,
            label=f"{N}x{H}/{Ht}x{V} {dt}{label}",
            params={"tokens": N, "hidden": H, "teacher_hidden": Ht, "vocab": V, "dtype": dt, **(params or {}),
                    "model": model},
            build=make_build(N, H, Ht, V, dtype),
            quick=quick,
            warmup=make_build(8, 16, 24, 64, dtype, **(warmup_options or {})),
            impls=impls,
            bytes_moved=lambda mode, b=(N * (H + Ht) + V * H + teacher_rows * Ht) * elem: b if mode == "fwd" else 2 * b,
            flops=lambda mode, f=f, g=2 * backward_products * n * H * read: f if mode == "fwd" else f + g,
            required_bytes=lambda mode, b=(N + V) * H * elem: 0 if mode == "fwd" else b,
        ))
    return out


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


def intermediate_step(fn: Optional[Callable], base: torch.Tensor, *args, backward: bool) -> Optional[Step]:
    """A step running ``fn(x, *args)`` (with ``backward`` also its backward) on logits ``x = leaf + 0``, an
    intermediate of the graph as a model's logits are, that its ``before`` hook builds outside the timed region and
    the memory probe's reset (the model's forward that made them is not timed). None when ``fn`` is."""
    if fn is None:
        return None
    made = []

    def before():
        with torch.set_grad_enabled(backward):
            made.append(base.detach().requires_grad_(backward) + 0)

    def step():
        x = made.pop()
        with torch.set_grad_enabled(backward):
            out = fn(x, *args)
            if backward:
                out.backward()
        return out

    step.before = before
    return step


def with_env(step: Optional[Step], **env: str) -> Optional[Step]:
    """``step`` run (backward included) with the environment variables ``env`` set, restored after."""
    if step is None:
        return None

    def run():
        with mock.patch.dict(os.environ, env):
            return step()
    return run


def hooks(step: Step):
    """``(before, after)`` of a step: its callables run around each of its calls, outside the timed region
    (no-ops when the step has none)."""
    return getattr(step, "before", None) or (lambda: None), getattr(step, "after", None) or (lambda: None)


def call(step: Step):
    """One call of ``step`` with its :func:`hooks` around it (a warm-up, a compile, a check); its output."""
    before, after = hooks(step)
    before()
    try:
        return step()
    finally:
        after()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: a row whose interquartile range exceeds this fraction of its median gets a warning line
WIDE_SPREAD = 0.25


def spread(times_ms) -> dict:
    """Median, quartiles (p25, p75, inclusive method), interquartile range and minimum of timings in ms."""
    times = sorted(times_ms)
    if not times:
        raise ValueError("spread: times_ms is empty")
    if len(times) == 1:
        p25 = p75 = times[0]
    else:
        p25, _, p75 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median_ms": statistics.median(times), "p25_ms": p25, "p75_ms": p75, "iqr_ms": p75 - p25,
            "min_ms": times[0], "runs": len(times)}


def relative_spread(row: dict) -> Optional[float]:
    """IQR / median of a timed row; None when the row has no timing or fewer than 2 runs."""
    if "iqr_ms" not in row or not row.get("median_ms") or row.get("runs", 0) < 2:
        return None
    return row["iqr_ms"] / row["median_ms"]


def timed_once_warnings(results: list) -> list:
    """A line when rows were timed once: their spread is unknown, not narrow (:func:`spread_warnings`
    cannot see them)."""
    once = sum(r.get("runs") == 1 for r in results)
    if not once:
        return []
    return [f"warning: {once} of {sum('median_ms' in r for r in results)} timed rows were timed once "
            f"(IQR '1 run'): their spread is unknown; rerun with --total-budget 0 or a larger --budget"]


def spread_warnings(results: list, threshold: float = WIDE_SPREAD) -> list:
    """One line per timed row whose IQR / median exceeds ``threshold``."""
    lines = []
    for r in results:
        rel = relative_spread(r)
        if rel is not None and rel > threshold:
            lines.append(f"warning: {r['op']} {r['case']} {r['mode']} {r['impl']}: IQR is {100 * rel:.0f}% of "
                         f"the median ({r['runs']} runs); the machine is busy or the step noisy: rerun on a "
                         f"quieter machine or with more --repeats")
    return lines


class Deadline:
    """The end of a run's total time budget; ``seconds=None`` (or 0) means no end."""

    def __init__(self, seconds: Optional[float], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.end = None if not seconds else clock() + seconds

    def left(self) -> Optional[float]:
        """Seconds left (negative once passed), or None without an end."""
        return None if self.end is None else self.end - self.clock()

    def passed(self) -> bool:
        return self.end is not None and self.clock() >= self.end


#: a step skipped because the run's total time budget ran out before its warm-up
OUT_OF_TIME = "the run's time budget was spent before its warm-up (rerun this op alone, or with --total-budget 0)"


def time_steps(steps: Dict[str, Step], device: torch.device, repeats: int, budget_s: float,
               clock: Callable[[], float] = time.perf_counter,
               deadline: Optional[Deadline] = None) -> Dict[str, dict]:
    """Time several candidate steps with their repetitions interleaved.

    Each step runs once as warm-up (in order), then rounds run every remaining step once each
    (A, B, C, A, B, C, ...), so a burst of load from elsewhere on the machine falls on all
    candidates alike rather than on whichever was being timed. Sustained oversubscription (more
    busy threads than cores) does not: it stalls a step of many small ops far more than one fused
    kernel, which inflates speedups (:func:`load_warnings`). Rounds continue until at least
    ``repeats`` rounds are done and a second has passed (at most 1000 rounds), or until ``budget_s``
    seconds of rounds are spent (so one round only when it alone outlasts the budget; a slow
    warm-up, such as torch.compile compiling, does not count). A step's :func:`hooks` run around
    each of its calls, outside the timed region. A step whose warm-up would start
    after ``deadline`` is skipped. Returns, per name, :func:`spread` of its times in ms,
    ``{"error": ...}`` for a step that raised (dropped from later rounds) or ``{"skipped": ...}``.
    """
    out: Dict[str, dict] = {}
    live = []
    for name, step in steps.items():
        if deadline is not None and deadline.passed():
            out[name] = {"skipped": OUT_OF_TIME}
            continue
        try:
            call(step)
            sync(device)
            live.append(name)
        except Exception as e:  # one candidate failing must not stop the others
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    times = {name: [] for name in live}
    start = clock()
    rounds = 0
    while live:
        for name in list(live):
            before, after = hooks(steps[name])
            try:
                before()
                try:
                    t0 = clock()
                    steps[name]()
                    sync(device)
                    times[name].append((clock() - t0) * 1e3)
                finally:
                    after()
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                live.remove(name)
                del times[name]
        rounds += 1
        elapsed = clock() - start
        if elapsed > budget_s:
            break
        if rounds >= repeats and (elapsed > min(budget_s, 1.0) or rounds >= 1000):
            break
    for name, ts in times.items():
        out[name] = spread(ts)
    return {name: out[name] for name in steps}


def time_step(step: Step, device: torch.device, repeats: int, budget_s: float) -> dict:
    """:func:`time_steps` of one step; a step that raises raises RuntimeError with its message."""
    row = time_steps({"step": step}, device, repeats, budget_s)["step"]
    if "error" in row:
        raise RuntimeError(row["error"])
    return row


def case_budget(budget_s: float, total_left_s: Optional[float], cases_left: int, timed_share: float = 0.5,
                floor_s: float = 0.2) -> float:
    """Seconds of timed rounds for the next (case, mode) under a total time budget.

    Each remaining (case, mode) gets an equal share of what is left of the total, of which
    ``timed_share`` goes to the timed rounds (the rest is left for warm-ups, building inputs and
    memory probes); never more than ``budget_s`` nor less than ``floor_s``. Without a total
    (``None``), ``budget_s``.
    """
    if total_left_s is None:
        return budget_s
    if cases_left < 1:
        raise ValueError(f"cases_left must be at least 1, got {cases_left}")
    return min(budget_s, max(floor_s, timed_share * max(total_left_s, 0.0) / cases_left))


#: loggers of third-party libraries whose warnings (torch.compile graph breaks, recompilations)
#: would otherwise flood the bench output
QUIET_LOGGERS = ("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx", "torch._logging",
                 "torch._subclasses", "triton")


@contextlib.contextmanager
def quiet_third_party():
    """Silence warnings issued from modules outside fastalign, and lower the torch.compile loggers
    to ERROR, for the duration of the block. fastalign's own warnings and every exception pass,
    except deprecation warnings: a baseline's library deprecating the function a case calls is
    reported from the case's frame, and says nothing about the measurement."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"fastalign(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_cpu_memory_here(step: Step) -> int:
    """Peak RSS growth (bytes) while running `step` once, in this process.

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) so
    input construction does not count; only meaningful in a fresh process. The step's
    :func:`hooks` run before the reset and after the measurement.
    """
    before, after = hooks(step)
    before()
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        step()
        return max(_status_kib("VmHWM") - base, 0) * 1024
    finally:
        after()


def measure_cuda_memory(step: Step, device: torch.device) -> int:
    before, after = hooks(step)
    before()
    try:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    finally:
        after()


#: glibc keeps freed blocks below a moving threshold mapped; a fixed threshold returns every block
#: of 128 KiB or more to the system when freed, so the resident peak follows what is allocated (as
#: the CUDA allocator's ``max_memory_allocated`` does) instead of what malloc happens to cache.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure_cpu_memory_subprocess(case: Case, mode: str, impl: str, timeout: float = 600) -> Optional[int]:
    """Run one step of (case, mode, impl) in a fresh interpreter and return its peak extra bytes
    (None when the probe fails or outlasts ``timeout`` seconds).

    The interpreter first runs the case's tiny-shape ``warmup`` step when the case has one, with
    compiled baselines switched on or off as in this process (``--no-compile``)."""
    spec = json.dumps({"case": case.key, "mode": mode, "impl": impl, "compile": optional.COMPILE["enabled"]})
    env = {**os.environ, **MALLOC_ENV}
    try:
        out = subprocess.run([sys.executable, "-m", "fastalign.bench._memprobe", spec], capture_output=True,
                             text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        sys.stderr.write(f"memory probe for {case.key} {mode} {impl} stopped after {timeout:.0f} s\n")
        return None
    if out.returncode != 0:
        sys.stderr.write(f"memory probe failed for {case.key} {mode} {impl}:\n{out.stderr[-2000:]}\n")
        return None
    return int(out.stdout.strip().splitlines()[-1])


#: operands of the matmul-rate measurement: big enough to reach the peak, small enough to measure quickly
MATMUL_SIDE = {"cpu": 2048, "cuda": 8192}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_limits(device: torch.device, dtypes=("bf16",), budget_s: float = 2.0) -> dict:
    """Measured peaks to read results against, on CPU and GPU alike.

    ``copy_GBps``: bytes read plus written per second by a large tensor copy (1 GiB on a GPU,
    256 MiB on CPU). ``matmul_TFLOPs``: per dtype name in ``dtypes``, the rate of a square matmul
    (8192 on a GPU, 2048 on CPU); fp32 on a GPU is measured with TF32 allowed, the precision
    fastalign's Triton kernels use for fp32 inputs there. Fastest of a few runs each. They are
    measured rates, not datasheet peaks: a step whose matrices block better than the square
    test can read above 100% of them.
    """
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_step(lambda: dst.copy_(src), device, 10, budget_s)["min_ms"]
    src = dst = None  # freed before the matmul operands are made
    side = MATMUL_SIDE.get(device.type, MATMUL_SIDE["cpu"])
    rates = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        for name in sorted(set(dtypes)):
            a = torch.randn(side, side, device=device).to(DTYPES[name])
            b = torch.randn_like(a)
            mm_ms = time_step(lambda: a @ b, device, 5, budget_s)["min_ms"]
            rates[name] = 2 * side**3 / mm_ms / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"copy_GBps": 2 * n * 4 / copy_ms / 1e6, "matmul_TFLOPs": rates}


def best_limits(a: dict, b: dict) -> dict:
    """The higher of two measurements of each limit (a busy moment only lowers a measured peak)."""
    rates = {k: max(v, (b.get("matmul_TFLOPs") or {}).get(k, 0.0)) for k, v in (a.get("matmul_TFLOPs") or {}).items()}
    return {"copy_GBps": max(a.get("copy_GBps", 0.0), b.get("copy_GBps", 0.0)), "matmul_TFLOPs": rates}


def roofline_ms(row: dict, limits: dict) -> Optional[tuple]:
    """``(ms, bound)``: the least time the measured limits allow for a row's work, the longer of
    bytes / copy bandwidth ("memory") and FLOPs / matmul rate of its dtype ("compute"); None when
    the row declares neither or the limit was not measured."""
    best = None
    if row.get("bytes") and limits.get("copy_GBps"):
        best = (row["bytes"] / limits["copy_GBps"] / 1e6, "memory")
    rate = (limits.get("matmul_TFLOPs") or {}).get(row.get("dtype", "bf16"))
    if row.get("flops") and rate:
        ms = row["flops"] / rate / 1e9
        if best is None or ms > best[0]:
            best = (ms, "compute")
    return best


def describe_limits(limits: dict) -> str:
    """One line: the measured copy bandwidth and matmul rates."""
    rates = ", ".join(f"{k} matmul {v:.2f} TFLOP/s" for k, v in sorted((limits.get("matmul_TFLOPs") or {}).items()))
    return f"device limits: copy {limits['copy_GBps']:.1f} GB/s" + (f", {rates}" if rates else "")


def describe_load(env: dict) -> Optional[str]:
    """The run's load average before (and after) it; None when the environment has no load average (another
    system, or a file recorded before it was kept)."""
    if env.get("load_avg") is None:
        return None
    after = env.get("load_avg_after")
    return f"load average {env['load_avg']:.2f} before the run" + ("" if after is None else f", {after:.2f} after")


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable threads), or None where the system does not report it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


#: load average (in cores) that the oversubscription warning lets pass: an idle machine's is seldom exactly 0
LOAD_SLACK = 0.25


def load_warnings(env: dict) -> list:
    """A line when the CPU was oversubscribed during a CPU run of :func:`environment` ``env``: the load
    average before the run above the cores its torch threads leave idle, or after it (the run's own threads
    included) above the cores, by more than :data:`LOAD_SLACK`. Then a many-op step stalls far more than a fused
    one and speedups are inflated."""
    cores, threads = env.get("cpu_cores"), env.get("cpu_threads")
    if not cores or not threads:
        return []
    for key, when, own in (("load_avg", "before the run", 0), ("load_avg_after", "after the run", threads)):
        load = env.get(key)
        if load is not None and load - own > cores - threads + LOAD_SLACK:
            return [f"warning: the CPU was oversubscribed: load average {load:.2f} {when}, {cores} cores, "
                    f"{threads} torch threads; times and speedups are unreliable (a step of many small ops "
                    f"stalls more than a fused one): rerun on a quieter machine"]
    return []


def source_commit() -> Optional[str]:
    """The commit of the fastalign source that runs: ``FASTALIGN_COMMIT`` when set (a copy without its git history,
    as a GPU machine gets), else ``git rev-parse HEAD`` of the checkout the package is imported from (an editable
    install); None for an installed wheel."""
    given = os.environ.get("FASTALIGN_COMMIT")
    if given:
        return given
    import fastalign

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastalign.__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        done = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return commit or None


def environment(device: torch.device) -> dict:
    import datetime
    import platform

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["fastalign-bench", *sys.argv[1:]]),  # quoted: it reruns as written
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
    info["commit"] = source_commit()
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                     platform.processor())
        info["device"] = f"CPU {model}, {os.cpu_count()} cores"
        info["cpu_threads"] = torch.get_num_threads()
        info["cpu_cores"] = os.cpu_count()
    info["load_avg"] = load_average()
    return info
