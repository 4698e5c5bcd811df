"""Markdown from recorded benchmark JSON, and README's performance table.

    python -m fastalign.bench.summary benchmarks/results/run.json            # markdown to stdout
    python -m fastalign.bench.summary --readme README.md benchmarks/results/*.json

The README table sits between ``<!-- perf-table:start -->`` and
``<!-- perf-table:end -->`` and is regenerated from the files, so every number
in it names the file (device and date) it comes from.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from fastalign.bench.core import (BASELINE, describe_limits, describe_load, load_warnings, relative_spread,
                                  timed_once_warnings)
from fastalign.bench.report import limit_fraction, memory_ratio, speedup, work_model

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def markdown(data: dict, source: str = "") -> str:
    env = data["environment"]
    lines = [f"## {env['device']} — {env['date']}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, fastalign {env['fastalign']}"
             + (f" (commit {env['commit'][:12]})" if env.get("commit") else "")
             + f", python {env['python']}" + (f"; file `{source}`" if source else ""), "",
             f"Command: `{env['command']}`", ""]
    if data.get("partial"):
        lines += ["**A partial run: it ended before its last case (a time limit), and these are the cases it "
                  "finished.**", ""]
    load = describe_load(env)
    if load:
        lines += [load[0].upper() + load[1:] + ".", ""]
    warnings = load_warnings(env) + timed_once_warnings(data["results"])
    if warnings:
        lines += [f"**{w.removeprefix('warning: ')}**" for w in warnings] + [""]
    if data.get("device_limits"):
        lines += ["Measured " + describe_limits(data["device_limits"]), ""]
    lines += ["| op | case | mode | impl | median ms | IQR % | speedup | peak extra MiB | memory ratio (beyond returned "
              "grads) | % limit | baseline |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in data["results"]:
        if "median_ms" not in r:
            why = r.get("skipped") or r.get("error", "")
            lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['impl']} | {why} | | | | | | |")
            continue
        mem_ratio = memory_ratio(r)
        rel = relative_spread(r)  # None in files recorded before the spread was kept
        lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['impl']} | {r['median_ms']:.2f} | "
                     f"{'1 run' if r.get('runs') == 1 else '-' if rel is None else f'{100 * rel:.0f}'} | {_x(speedup(r))} | {_mib(r.get('peak_extra_bytes'))} | "
                     f"{'-' if mem_ratio is None else f'{mem_ratio:.3f}'} | "
                     f"{'-' if limit_fraction(r) is None else f'{100 * limit_fraction(r):.1f}'} | "
                     f"{r.get('baseline', BASELINE)} |")
    model = work_model(data["results"])
    if model:
        lines += ["", "% limit: the least time the measured copy bandwidth and matmul rate allow for the step's "
                  "bytes and FLOPs, over its time (the work of every row: an implementation that skips unscored "
                  "rows, in the prompt-share cases, can pass 100%).", ""] + [f"- {ln.strip()}" for ln in model[1:]]
    return "\n".join(lines) + "\n"


def readme_table(files) -> str:
    """fastalign rows only: speed-up and memory ratio against each case's baseline, citing the file; a
    case measured in several runs on one device shows its newest run."""
    lines = ["| op | case | mode | median ms | speedup | memory ratio | baseline | device, date (file) |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
    rows = {}  # (device, op, case, mode) -> (date, line), in the order first seen
    for path in files:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "results" not in data or "environment" not in data:
            continue  # not a run (a single-case script's record)
        env = data["environment"]
        cite = f"{env['device']}, {env['date'][:10]} (`{os.path.basename(path)}`)"
        for r in data["results"]:
            if r["impl"] != "fastalign" or "median_ms" not in r:
                continue
            mem = memory_ratio(r)
            line = (f"| {r['op']} | {r['case']} | {r['mode']} | {r['median_ms']:.2f} | "
                    f"{_x(speedup(r))} | {'-' if mem is None else f'{mem:.3f}'} | "
                    f"{r.get('baseline', BASELINE)} | {cite} |")
            key = (env["device"], r["op"], r["case"], r["mode"])
            if key not in rows or env["date"] >= rows[key][0]:
                rows[key] = (env["date"], line)
    return "\n".join(lines + [line for _date, line in rows.values()])


def update_readme(readme: str, files) -> None:
    with open(readme) as f:
        text = f.read()
    block = f"{START}\n{readme_table(files)}\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + block + "\n"
    with open(readme, "w") as f:
        f.write(text)


#: what a JSON value that is not an object is, by its Python type
JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
              type(None): "null"}


def _load(p: argparse.ArgumentParser, path: str) -> dict:
    """The JSON object in ``path``; a usage error (exit status 2) when the file cannot be read, is not JSON
    or holds another JSON value."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        p.error(f"argument files: cannot read {path}: {e.strerror or e}")
    except ValueError as e:
        p.error(f"argument files: {path} is not JSON ({e})")
    if not isinstance(data, dict):
        p.error(f"argument files: {path} is not a fastalign-bench run (it holds {JSON_KINDS[type(data)]}, "
                f"not a JSON object)")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastalign.bench.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--readme", default=None, help="rewrite the performance table in this README")
    args = p.parse_args(argv)
    runs = {path: _load(p, path) for path in args.files}  # every file checked before anything is written
    if args.readme:
        try:
            update_readme(args.readme, sorted(args.files))
        except OSError as e:
            p.error(f"argument --readme: cannot rewrite {args.readme}: {e.strerror or e}")
        return 0
    status = 0
    for path, data in runs.items():
        if "results" not in data or "environment" not in data:
            print(f"{p.prog}: {path} is not a fastalign-bench run (no \"environment\" and \"results\"); skipped",
                  file=sys.stderr)
            status = 1
            continue
        print(markdown(data, os.path.relpath(path)))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
