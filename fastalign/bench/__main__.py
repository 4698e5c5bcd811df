"""``fastalign-bench`` / ``python -m fastalign.bench``: time and memory of every op
against its baselines, measured in the same run with the implementations'
repetitions interleaved, so load from elsewhere on the machine falls on all
of them alike; the table gives the median and the interquartile range.

    fastalign-bench --quick                     # CPU, ~3 minutes on 2 cores (make bench)
    fastalign-bench --device cuda --json out.json --plot out.png
    fastalign-bench --ops token_logprobs,policy_loss --no-memory
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fastalign.bench import core, optional, report
from fastalign.bench.cases import all_cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fastalign-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small CPU-friendly set of cases (default of make bench)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    p.add_argument("--cases", default=None, help="comma-separated substrings of case labels (e.g. 2048x152064)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per step (default 5 quick, 20 full)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed rounds per case and mode, all implementations together, before "
                        "stopping early (default 4 quick, 20 full)")
    p.add_argument("--total-budget", type=float, default=None, metavar="SECONDS",
                   help="end the whole run within this time: each case's timed rounds get a share of what "
                        "is left, and warm-ups and memory probes that would start after it are skipped "
                        "(default 240 with --quick, none otherwise; 0 for none)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--json", default=None, metavar="OUT", help="write every figure with device/date/versions")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="plot time and memory per case")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="write DIR/<device>-<date>.json, .md and .png (e.g. benchmarks/results)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


#: --quick's default --total-budget: no warm-up or memory probe starts after it, so the whole run,
#: compiling included, ends within about 5 minutes (a step started before it runs to its end)
QUICK_TOTAL_S = 240.0


def selected_cases(args, device_type: str):
    ops = set(args.ops.split(",")) if args.ops else None
    labels = args.cases.split(",") if args.cases else None
    out = [c for c in all_cases() if (ops is None or c.op in ops) and (c.quick or not args.quick)
           and device_type in c.devices and (labels is None or any(s in c.label for s in labels))]
    if ops:
        unknown = ops - {c.op for c in all_cases()}
        if unknown:
            raise SystemExit(f"unknown op(s): {', '.join(sorted(unknown))}")
    return out


def progress(total):
    try:
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return None


#: a memory probe (a fresh interpreter building the inputs) is not started with less time left than this,
#: beyond RESERVE_PER_CASE_S for each (case, mode) still to run: probes of a slow case must not starve
#: the timing of the cases after it
MIN_PROBE_S = 5.0
RESERVE_PER_CASE_S = 15.0
MEMORY_OUT_OF_TIME = "the run's time budget was spent"


def measure_case(case, mode: str, device, repeats: int, budget: float, memory: bool = True,
                 deadline: core.Deadline = core.Deadline(None), reserve_s: float = 0.0) -> list:
    """Rows of one (case, mode): every implementation timed with interleaved repetitions, then
    its peak memory measured, each only while ``deadline`` leaves time for it (for the memory
    probes: ``reserve_s`` seconds more, kept for the cases after this one)."""
    if deadline.passed():  # not even its inputs are built
        return [{"op": case.op, "case": case.label, "mode": mode, "impl": impl, "baseline": case.baseline,
                 **case.params, "skipped": core.OUT_OF_TIME} for impl in case.impls]
    impls = case.build(device, mode)
    rows, steps = {}, {}
    for impl, step in impls.items():
        rows[impl] = {"op": case.op, "case": case.label, "mode": mode, "impl": impl, "baseline": case.baseline,
                      **case.params}
        if step is None:
            rows[impl]["skipped"] = "not installed, disabled, or not for this device"
        else:
            steps[impl] = step
    for impl, timing in core.time_steps(steps, device, repeats, budget, deadline=deadline).items():
        row = rows[impl]
        row.update(timing)
        if "median_ms" not in row or not memory:
            continue
        left = deadline.left()
        if left is not None and left - reserve_s < MIN_PROBE_S:
            row["memory_skipped"] = MEMORY_OUT_OF_TIME
            continue
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


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    optional.COMPILE["enabled"] = not args.no_compile
    repeats = args.repeats or (5 if args.quick else 20)
    budget = args.budget or (4.0 if args.quick else 20.0)
    modes = args.modes.split(",")
    cases = selected_cases(args, device.type)
    env = core.environment(device)
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
        else:
            print(f"[{i + 1}/{len(todo)}] {desc}", file=sys.stderr, flush=True)
        with core.quiet_third_party():
            results += measure_case(case, mode, device, repeats,
                                    core.case_budget(budget, deadline.left(), len(todo) - i),
                                    memory=not args.no_memory, deadline=deadline,
                                    reserve_s=RESERVE_PER_CASE_S * (len(todo) - i - 1))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if results and not deadline.passed():  # a peak is the best seen: load from elsewhere only lowers a rate
        limits = core.best_limits(limits, core.device_limits(device, limits.get("matmul_TFLOPs", {})))
    report.add_ratios(results, limits)
    return {"environment": env, "device_limits": limits, "results": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for c in all_cases():
            print(f"{c.op:20s} {c.label:40s} {'quick' if c.quick else 'full':5s} {'/'.join(c.devices):9s} "
                  f"vs {c.baseline}")
        return 0
    data = run(args)
    print(report.table(data))
    for line in core.spread_warnings(data["results"]):
        print(line)
    if args.record:
        import os
        import re

        from fastalign.bench import summary

        slug = re.sub(r"[^A-Za-z0-9]+", "-", data["environment"]["device"]).strip("-").lower()
        kind = "quick" if args.quick else "full"
        if args.ops:  # a partial run gets its own files
            kind += "-" + "-".join(sorted(args.ops.split(",")))
        stem = os.path.join(args.record, f"{slug}-{data['environment']['date'][:10]}-{kind}")
        os.makedirs(args.record, exist_ok=True)
        args.json, args.plot = args.json or stem + ".json", args.plot or stem + ".png"
        with open(stem + ".md", "w") as f:
            f.write(summary.markdown(data, os.path.relpath(stem + ".json")))
        print(f"wrote {stem}.md")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(data, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
