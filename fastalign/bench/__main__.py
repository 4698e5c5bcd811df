"""``fastalign-bench`` / ``python -m fastalign.bench``: time and memory of every op
against its baselines, measured in the same run with the implementations'
repetitions interleaved, so a burst of load from elsewhere on the machine falls
on all of them alike; the table gives the median and the interquartile range.
Sustained load does not fall alike: on an oversubscribed CPU (load average
above the idle cores) a many-op step stalls far more than a fused one, so
speedups are inflated; the run records the load average and warns.

    fastalign-bench --quick                     # CPU, within about 5 minutes (make bench)
    fastalign-bench --device cuda --json out.json --plot out.png
    fastalign-bench --ops token_logprobs,policy_loss --no-memory
    fastalign-bench --list --ops policy_loss --quick   # the cases a run would time
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile

import torch

from fastalign.bench import core, optional, report
from fastalign.bench.cases import all_cases

MODES = ("fwd", "fwd+bwd")


def _items(text: str) -> list:
    """The non-empty items of a comma-separated option value, spaces around them removed."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _list_of(what: str):
    def parse(text: str) -> list:
        items = _items(text)
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def _modes(text: str) -> list:
    items = _list_of("modes")(text)
    bad = [m for m in items if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"invalid mode {bad[0]!r} (choose from {', '.join(MODES)})")
    return items


def _positive(kind):
    """A parser of a positive, finite number of type ``kind``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
        return value
    return parse


def _seconds_or_none(text: str) -> float:
    """Seconds of a time limit: 0 (no limit) or a positive, finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or positive and finite, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastalign-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small CPU-friendly set of cases (default of make bench)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--ops", default=None, type=_list_of("op names"), help="comma-separated op names (default: all)")
    p.add_argument("--cases", default=None, type=_list_of("substrings"),
                   help="comma-separated substrings of case labels (e.g. 2048x152064); each must match a case")
    p.add_argument("--modes", default=",".join(MODES), type=_modes, help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--repeats", type=_positive(int), default=None,
                   help="timed runs per step: at least this many (more until the rounds have taken a second, at "
                        "most 1000), unless --budget runs out first (default 5 quick, 20 full)")
    p.add_argument("--budget", type=_positive(float), default=None,
                   help="seconds of timed rounds per case and mode, all implementations together, before "
                        "stopping early (default 4 quick, 20 full)")
    p.add_argument("--total-budget", type=_seconds_or_none, default=None, metavar="SECONDS",
                   help="end the whole run within this time: each case's timed rounds get a share of what "
                        "is left, and warm-ups and memory probes that would start after it are skipped "
                        "(default 240 with --quick, none otherwise; 0 for none)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write every figure with device/date/versions (after each case too, marked "
                        '"partial": true until the run ends, so a run killed by a time limit keeps its rows)')
    p.add_argument("--plot", default=None, metavar="OUT.png", help="plot time and memory per case")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="write DIR/<device>-<UTC date>-<quick|full>[-<ops>][-cases-<cases>][-<mode>].json, .md "
                        "and .png (e.g. benchmarks/results); refuses a name that exists (see --overwrite) and "
                        "a run with no timed row")
    p.add_argument("--overwrite", action="store_true", help="let --record replace a run recorded under the same name")
    p.add_argument("--list", action="store_true",
                   help="list the cases that --ops, --cases, --modes, --quick and --device select, and exit")
    return p


def _device(p: argparse.ArgumentParser, args) -> str:
    """The device type the run uses ("cpu" or "cuda"); None for ``--list`` without ``--device``. A usage error
    for a device that is not one, or (except for ``--list``) a CUDA device torch cannot use here."""
    if args.device is None:
        return None if args.list else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        p.error(f"argument --device: invalid device {args.device!r} (cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"argument --device: no benchmark case runs on {device.type!r} (cpu, cuda or cuda:N)")
    if device.type == "cuda" and not args.list:
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            p.error(f"argument --device: {args.device!r} is not available here ({why}; torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"argument --device: {args.device!r} is not available here "
                    f"({torch.cuda.device_count()} CUDA device(s) visible)")
    return device.type


def _unwritable(path: str, directory: bool = False):
    """Why the run could not write ``path`` when it ends (None when it can): a file needs an existing, writable
    directory and must not be a directory; a ``directory`` (--record) must be one, or be creatable in the
    nearest existing directory above it."""
    path = os.path.abspath(path)
    if directory and os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a directory"
    if not directory and os.path.isdir(path):
        return f"{path} is a directory"
    parent = path if directory else os.path.dirname(path)
    while directory and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory" if os.path.exists(parent) else f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    if not directory and os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def parse_args(argv=None):
    """The parsed options, each checked: a value that selects nothing, a device that cannot run here, or an
    output path the run could not write at its end, is a usage error rather than an empty or lost run.
    ``args.device_type`` is the device type the cases are selected for."""
    p = build_parser()
    args = p.parse_args(argv)
    args.device_type = _device(p, args)
    if args.overwrite and not args.record:
        p.error("argument --overwrite: applies only with --record (it lets a recorded run be replaced)")
    for option, path, directory in (("--json", args.json, False), ("--plot", args.plot, False),
                                    ("--record", args.record, True)):
        if path == "":
            p.error(f"argument {option}: expected a path, got ''")
        why = path and _unwritable(path, directory)
        if why:
            p.error(f"argument {option}: cannot write {path!r}: {why}")
    if (args.plot or args.record) and importlib.util.find_spec("matplotlib") is None:  # known now, not at the end
        p.error(f"argument {'--plot' if args.plot else '--record'}: the plot needs matplotlib "
                "(pip install matplotlib, or the bench extra: pip install 'fastalign[bench]')")
    if args.plot:  # matplotlib writes the format of the file's extension, and adds .png to a name without one
        formats = report.plot_formats()
        extension = os.path.splitext(args.plot)[1][1:].lower()
        if extension not in formats:
            p.error(f"argument --plot: {args.plot!r} needs an image extension matplotlib writes "
                    f"({', '.join('.' + f for f in sorted(formats))})")
    try:
        selected_cases(args, args.device_type)
    except ValueError as e:
        p.error(str(e))
    return args


#: --quick's default --total-budget: no warm-up or memory probe starts after it, so the whole run,
#: compiling included, ends within about 5 minutes (a step started before it runs to its end)
QUICK_TOTAL_S = 240.0


def _split(value) -> list:
    """A list option as parsed, or a comma-separated string (a Namespace built by hand)."""
    if value is None:
        return None
    return _items(value) if isinstance(value, str) else list(value)


def selected_cases(args, device_type) -> list:
    """The cases ``args`` select on ``device_type`` (every device when None) that run in at least one selected
    mode. ValueError naming the option when an op is unknown, a ``--cases`` substring matches no case, or nothing
    is left to run."""
    ops, labels, modes = _split(args.ops), _split(args.cases), _split(args.modes) or list(MODES)
    known = {c.op for c in all_cases()}
    unknown = sorted(set(ops or ()) - known)
    if unknown:
        raise ValueError(f"argument --ops: unknown op(s) {', '.join(unknown)} (choose from {', '.join(sorted(known))})")
    pool = [c for c in all_cases() if (ops is None or c.op in ops) and (c.quick or not args.quick)
            and (device_type is None or device_type in c.devices)]
    in_modes = [c for c in pool if any(m in modes for m in c.modes)]
    if pool and not in_modes:
        raise ValueError(f"argument --modes: no selected case runs in {', '.join(modes)} "
                         f"(their modes: {', '.join(sorted({m for c in pool for m in c.modes}))})")
    pool = in_modes  # each op and substring must select a case that runs in a selected mode
    where = " ".join(filter(None, [f"--ops {','.join(ops)}" if ops else "", "--quick" if args.quick else "",
                                    f"--device {device_type}" if device_type else "",
                                    f"--modes {','.join(modes)}" if set(modes) != set(MODES) else ""]))
    for op in ops or ():
        if not any(c.op == op for c in pool):
            raise ValueError(f"argument --ops: {op!r} has no case{' of ' + where if where else ''} "
                             f"(`fastalign-bench --list --ops {op}` lists its cases)")
    for s in labels or ():
        if not any(s in c.label for c in pool):
            raise ValueError(f"argument --cases: {s!r} is in no case label{' of ' + where if where else ''} "
                             f"(`fastalign-bench --list{' ' + where if where else ''}` lists them)")
    out = [c for c in pool if labels is None or any(s in c.label for s in labels)]
    if not out:
        raise ValueError(f"argument --modes: no selected case runs in {', '.join(modes)}")
    if ops:  # in the order --ops names them (a run cut short by --total-budget skips the last ones)
        out.sort(key=lambda c: ops.index(c.op))  # stable: each op's cases keep their order
    return out


def progress(total):
    try:
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return None


#: a memory probe is not started with less time left than this, beyond RESERVE_PER_CASE_S (by device type) for
#: each (case, mode) still to run: probes of a slow case must not starve the timing of the cases after it. A
#: CPU probe is a fresh interpreter building the inputs; a CUDA one runs the step once more in this process.
MIN_PROBE_S = 5.0
RESERVE_PER_CASE_S = {"cpu": 15.0, "cuda": 6.0}
MEMORY_OUT_OF_TIME = "the run's time budget was spent"
NOT_RUN = "not installed, disabled, or not for this device"


def measure_case(case, mode: str, device, repeats: int, budget: float, memory: bool = True,
                 deadline: core.Deadline = core.Deadline(None), reserve_s: float = 0.0, note=None) -> list:
    """Rows of one (case, mode): every implementation timed with interleaved repetitions, then
    its peak memory measured, each only while ``deadline`` leaves time for it (for the memory
    probes: ``reserve_s`` seconds more, kept for the cases after this one). ``note(text)``, when
    given, is told each stage as it starts (building, timing, each memory probe)."""
    note = note or (lambda text: None)
    if deadline.passed():  # not even its inputs are built: the rows that could have run are out of time
        unavailable = {impl for impl in case.impls if not optional.available(impl)}
        return [{"op": case.op, "case": case.label, "mode": mode, "impl": impl, "baseline": case.baseline,
                 **case.params, "skipped": NOT_RUN if impl in unavailable else core.OUT_OF_TIME}
                for impl in case.impls]
    note("building inputs")
    impls = case.build(device, mode)
    rows, steps = {}, {}
    for impl, step in impls.items():
        rows[impl] = {"op": case.op, "case": case.label, "mode": mode, "impl": impl, "baseline": case.baseline,
                      **case.params}
        if step is None:
            rows[impl]["skipped"] = NOT_RUN
        else:
            steps[impl] = step
    note(f"warm-up and timing of {len(steps)} implementation(s)")
    for impl, timing in core.time_steps(steps, device, repeats, budget, deadline=deadline).items():
        row = rows[impl]
        row.update(timing)
        if "median_ms" not in row or not memory:
            continue
        left = deadline.left()
        if left is not None and left - reserve_s < MIN_PROBE_S:
            row["memory_skipped"] = MEMORY_OUT_OF_TIME
            continue
        note(f"peak memory of {impl}")
        try:
            if device.type == "cuda":
                row["peak_extra_bytes"] = core.measure_cuda_memory(steps[impl], device)
            else:
                row["peak_extra_bytes"] = core.measure_cpu_memory_subprocess(
                    case, mode, impl, timeout=600 if left is None else left - reserve_s)
                if row["peak_extra_bytes"] is None and deadline.passed():
                    row["memory_skipped"] = MEMORY_OUT_OF_TIME
        except Exception as e:  # a baseline failing must not end the run
            row["error"] = f"{type(e).__name__}: {e}"[:300]
    for row in rows.values():
        if "median_ms" not in row:
            continue
        if case.bytes_moved:
            row["bytes"] = case.bytes_moved(mode)
            row["GBps"] = row["bytes"] / row["median_ms"] / 1e6
        if case.flops:
            row["flops"] = case.flops(mode)
            row["TFLOPs"] = row["flops"] / row["median_ms"] / 1e9
        if case.required_bytes and row.get("peak_extra_bytes") is not None:
            row["required_bytes"] = case.required_bytes(mode)
    return list(rows.values())


def _run_device(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run(args, env: dict = None, on_case=None) -> dict:
    """Every selected (case, mode) measured; ``env`` is :func:`fastalign.bench.core.environment` of the run's
    device when already taken. ``on_case`` is called after each (case, mode) with the results so far, in the
    returned form (a run killed later keeps them)."""
    device = _run_device(args)
    optional.COMPILE["enabled"] = not args.no_compile
    repeats = args.repeats or (5 if args.quick else 20)
    budget = args.budget or (4.0 if args.quick else 20.0)
    modes = _split(args.modes) or list(MODES)
    cases = selected_cases(args, device.type)
    env = env or core.environment(device)
    total = args.total_budget if args.total_budget is not None else (QUICK_TOTAL_S if args.quick else 0.0)
    deadline = core.Deadline(total)
    limits = core.device_limits(device, {c.params.get("dtype", "fp32") for c in cases if c.flops})
    results = []
    todo = [(c, m) for c in cases for m in c.modes if m in modes]
    bar = progress(len(todo))
    for i, (case, mode) in enumerate(todo):
        desc = f"{case.op} {case.label} {mode}"
        if bar is not None:
            bar.set_description(desc)

            def note(text):
                bar.set_postfix_str(text)
        else:
            print(f"[{i + 1}/{len(todo)}] {desc}", file=sys.stderr, flush=True)

            def note(text):
                print(f"    {text}", file=sys.stderr, flush=True)
        with core.quiet_third_party():
            results += measure_case(case, mode, device, repeats,
                                    core.case_budget(budget, deadline.left(), len(todo) - i),
                                    memory=not args.no_memory, deadline=deadline,
                                    reserve_s=RESERVE_PER_CASE_S[device.type] * (len(todo) - i - 1), note=note)
        if bar is not None:
            bar.set_postfix_str("")
            bar.update(1)
        if on_case is not None:
            so_far = copy.deepcopy(results)
            report.add_ratios(so_far, limits)
            on_case({"environment": env, "device_limits": limits, "results": so_far})
    if bar is not None:
        bar.close()
    if results and not deadline.passed():  # a peak is the best seen: load from elsewhere only lowers a rate
        limits = core.best_limits(limits, core.device_limits(device, limits.get("matmul_TFLOPs", {})))
    report.add_ratios(results, limits)
    env["load_avg_after"] = core.load_average()
    return {"environment": env, "device_limits": limits, "results": results}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_+]+", "-", text).strip("-")


#: a longer --cases part of a recorded name is cut and followed by a hash of the option's value
MAX_CASES_NAME = 40


def record_stem(args, env: dict) -> str:
    """``DIR/<device>-<UTC date>-<quick|full>[-<ops>][-cases-<cases>][-<mode>]`` (without extension) for
    ``--record DIR``: every option that selects what runs is in the name, so two different selections recorded
    on one day get different files (the modes only when one of the two is left out)."""
    parts = [_slug(env["device"]).lower(), env["date"][:10], "quick" if args.quick else "full"]
    ops = _split(args.ops)
    if ops:
        parts.append("-".join(sorted(ops)))
    labels = _split(args.cases)
    if labels:
        joined = "-".join(sorted(labels))
        name = _slug(joined)
        if len(name) > MAX_CASES_NAME or name != joined:  # cut, or characters replaced: two selections could meet
            digest = hashlib.sha1(",".join(sorted(labels)).encode()).hexdigest()[:8]
            name = name[:MAX_CASES_NAME - 9].rstrip("-") + "-" + digest
        parts.append("cases-" + name)
    modes = _split(args.modes) or list(MODES)
    if set(modes) != set(MODES):
        parts += modes
    return os.path.join(args.record, "-".join(parts))


def list_cases(args) -> None:
    modes = _split(args.modes) or list(MODES)
    for c in selected_cases(args, args.device_type):
        print(f"{c.op:20s} {c.label:40s} {'quick' if c.quick else 'full':5s} {'/'.join(c.devices):9s} "
              f"{'/'.join(m for m in c.modes if m in modes):11s} vs {c.baseline}")


def _replace(path: str, text: str) -> None:
    """``path`` holds ``text``, written beside it and renamed over it: a reader, or a kill, never sees half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _text_writer(text: str):
    """A writer of ``text`` for :func:`_save`."""
    return lambda path: _replace(path, text)


def _save(option: str, path: str, write) -> bool:
    """``write(path)``, then "wrote PATH"; whether it was written. An OSError (a disk filled, a directory
    removed during the run) is reported on stderr, naming ``option``, instead of raised: it loses none of the
    run's other outputs."""
    try:
        write(path)
    except OSError as e:
        print(f"fastalign-bench: argument {option}: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_cases(args)
        return 0
    env = core.environment(_run_device(args))
    stem = None
    if args.record:
        stem = record_stem(args, env)
        if os.path.exists(stem + ".json") and not args.overwrite:
            build_parser().error(f"argument --record: {stem}.json exists (a run of the same device, date and "
                                 f"selection); pass --overwrite to replace it, or record into another directory")
    def partial(data):  # --json after each case, marked partial, replaced whole (a run killed keeps its rows)
        try:
            _replace(args.json, json.dumps({**data, "partial": True}, indent=1))
        except OSError:
            pass  # reported when the whole run is written

    data = run(args, env, on_case=partial if args.json is not None else None)
    print(report.table(data))
    for line in (core.load_warnings(data["environment"]) + core.spread_warnings(data["results"])
                 + core.timed_once_warnings(data["results"])):
        print(line)
    timed = any("median_ms" in r for r in data["results"])
    if stem is not None and not timed:
        print(f"fastalign-bench: --record: no row was timed (every implementation was skipped or failed); "
              f"nothing recorded under {stem}", file=sys.stderr)
    results = json.dumps(data, indent=1)
    json_saved = []  # per JSON file of the results asked for: whether it was written
    saved = []
    if stem is not None and timed:
        from fastalign.bench import summary

        def record_json(path):
            os.makedirs(args.record, exist_ok=True)
            _text_writer(results)(path)

        json_saved.append(_save("--record", stem + ".json", record_json))
        # the markdown sits beside the JSON it cites
        saved.append(_save("--record", stem + ".md", _text_writer(summary.markdown(data, os.path.basename(
            stem + ".json")))))
        saved.append(_save("--record", stem + ".png", lambda path: report.plot(data, path)))
    recorded = (stem + ".json", stem + ".png") if stem is not None and timed else ()
    if args.json is not None and os.path.abspath(args.json) not in map(os.path.abspath, recorded):
        json_saved.append(_save("--json", args.json, _text_writer(results)))
    if args.plot is not None and os.path.abspath(args.plot) not in map(os.path.abspath, recorded):
        if timed:
            saved.append(_save("--plot", args.plot, lambda path: report.plot(data, path)))
        else:
            print(f"nothing to plot: no row was timed ({args.plot} not written)")
    if json_saved and not any(json_saved):  # the results are kept somewhere all the same
        fd, path = tempfile.mkstemp(prefix="fastalign-bench-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(results)
        print(f"fastalign-bench: the results are in {path} instead", file=sys.stderr)
    if (stem is not None and not timed) or not all(json_saved + saved):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
