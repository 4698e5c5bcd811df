"""Ratios, the plain-text table and the plot of benchmark results."""
from __future__ import annotations

from fastalign.bench.core import BASELINE, OUT_OF_TIME, describe_limits, describe_load, relative_spread, roofline_ms


def speedup(r: dict):
    """Baseline time / time (``speedup_vs_eager`` in files recorded before baselines were per case)."""
    return r.get("speedup", r.get("speedup_vs_eager"))


def memory_ratio(r: dict):
    """Peak extra memory / the baseline's, both beyond the gradients every implementation returns."""
    return r.get("memory_ratio", r.get("memory_vs_eager"))


def limit_fraction(r: dict):
    """Share of the measured limit a row reaches: the least time the limits allow / its time
    (``bandwidth_fraction`` in files recorded before the limit was a roofline)."""
    return r.get("limit_fraction", r.get("bandwidth_fraction", r.get("flops_fraction")))


def add_ratios(results: list, limits: dict) -> None:
    """speedup = baseline time / time and memory_ratio = memory / baseline memory, same case and
    mode; limit_ms, bound and limit_fraction from :func:`fastalign.bench.core.roofline_ms`.

    A row's baseline is its case's (``row["baseline"]``, ``eager`` unless the case names another)."""
    by_key = {(r["op"], r["case"], r["mode"], r["impl"]): r for r in results if "median_ms" in r}
    for r in results:
        r.setdefault("baseline", BASELINE)
        if "median_ms" not in r:
            continue
        roof = roofline_ms(r, limits)
        if roof is not None:
            r["limit_ms"], r["bound"] = roof
            r["limit_fraction"] = r["limit_ms"] / r["median_ms"]
        b = by_key.get((r["op"], r["case"], r["mode"], r["baseline"]))
        if b is None:
            continue
        r["speedup"] = b["median_ms"] / r["median_ms"]
        if r.get("peak_extra_bytes") is not None and b.get("peak_extra_bytes"):
            req = r.get("required_bytes", 0)
            # memory beyond inputs and the gradients every implementation must return
            r["memory_ratio"] = max(r["peak_extra_bytes"] - req, 0) / max(b["peak_extra_bytes"] - req, 1)


def work_model(results: list) -> list:
    """One line per (case, mode) with a declared amount of work: its bytes and FLOPs, the least
    time the measured limits allow, which limit binds, and fastalign's share of it."""
    lines, seen = [], set()
    for r in results:
        key = (r["op"], r["case"], r["mode"])
        if key in seen or "limit_ms" not in r:
            continue
        seen.add(key)
        work = ", ".join(part for part in (
            f"{r['bytes'] / 1e9:.3g} GB" if r.get("bytes") else "",
            f"{r['flops'] / 1e12:.3g} TFLOP" if r.get("flops") else "") if part)
        ours = next((x for x in results if (x["op"], x["case"], x["mode"]) == key and x["impl"] == "fastalign"
                     and "limit_fraction" in x), None)
        share = "" if ours is None else f"; fastalign at {100 * ours['limit_fraction']:.1f}% of it"
        lines.append(f"  {r['op']} {r['case']} {r['mode']}: {work} -> at least {r['limit_ms']:.4g} ms "
                     f"({r['bound']}-bound){share}")
    return ["work per step and the least time the measured limits allow:"] + lines if lines else []


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(data: dict) -> str:
    env, limits = data["environment"], data["device_limits"]
    lines = [f"fastalign-bench  {env['device']}  torch {env['torch']}  triton {env.get('triton')}  {env['date']}"]
    if describe_load(env):
        cores = f"; {env['cpu_cores']} cores, {env['cpu_threads']} torch threads" if env.get("cpu_cores") else ""
        lines.append(describe_load(env) + cores)
    if limits:
        lines.append(describe_limits(limits))
    cw = max([22] + [len(r["case"]) for r in data["results"]])
    iw = max([14] + [len(r["impl"]) for r in data["results"]])
    ow = max([18] + [len(r["op"]) for r in data["results"]])
    head = f"{'op':{ow}s} {'case':{cw}s} {'mode':8s} {'impl':{iw}s} {'median ms':>10s} {'IQR %':>6s} {'speedup':>9s} " \
           f"{'extra MiB':>10s} {'mem ratio':>9s} {'% limit':>8s}  baseline"
    lines += [head, "-" * len(head)]
    foot = "IQR %: interquartile range of the timed runs / median ('1 run': timed once, spread unknown); speedup: baseline time / time; extra MiB: peak memory beyond the inputs; mem ratio: to the " \
           "baseline's, after removing the gradients every implementation returns; % limit: the least time " \
           "the measured copy bandwidth and matmul rate allow for the step's bytes and FLOPs / its time (the work " \
           "of every row: one that skips unscored rows, in the prompt-share cases, can pass 100%)"
    for r in data["results"]:
        prefix = f"{r['op']:{ow}s} {r['case']:{cw}s} {r['mode']:8s} {r['impl']:{iw}s}"
        if "skipped" in r or "error" in r:
            lines.append(f"{prefix} {'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error']}")
            continue
        mem = r.get("peak_extra_bytes")
        frac = limit_fraction(r)
        rel = relative_spread(r)  # None in files recorded before the spread was kept
        iqr = "1 run" if r.get("runs") == 1 else _fmt(None if rel is None else 100 * rel, '6.0f')
        lines.append(
            f"{prefix} {r['median_ms']:10.2f} {iqr:>6s} "
            f"{'-' if speedup(r) is None else format(speedup(r), '8.2f') + 'x':>9s} "
            f"{_fmt(None if mem is None else mem / 2**20, '10.1f'):>10s} "
            f"{_fmt(memory_ratio(r), '9.3f'):>9s} {_fmt(None if frac is None else 100 * frac, '7.1f'):>8s}  "
            f"{r.get('baseline', BASELINE)}")
    lines += ["-" * len(head), foot]
    out_of_time = sum(r.get("skipped") == OUT_OF_TIME for r in data["results"])
    if out_of_time:
        lines.append(f"{out_of_time} of {len(data['results'])} rows skipped for time: the run's time budget was "
                     f"spent (rerun with --total-budget 0, or those ops alone)")
    unmeasured = sum("memory_skipped" in r for r in data["results"])
    if unmeasured:
        lines.append(f"peak memory not measured for {unmeasured} rows: the run's time budget was spent (rerun "
                     f"those ops alone, or with --total-budget 0)")
    lines += work_model(data["results"])
    return "\n".join(lines)


#: peak extra memory (MiB) below which the memory axis is linear: a step that needs no memory beyond its
#: inputs (0 bytes) is drawn at the bottom rather than dropped from a logarithmic axis
MEMORY_LINEAR_MIB = 0.1


def plot_formats() -> set:
    """The file extensions (without the dot) matplotlib's Agg backend writes, which :func:`plot` takes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return set(FigureCanvasAgg(Figure()).get_supported_filetypes())


def plot(data: dict, path: str) -> bool:
    """Time and peak extra memory per case (x: tokens x vocab), one line per implementation. False, writing
    nothing, when no row was timed."""
    rows = [r for r in data["results"] if "median_ms" in r]
    panels = sorted({(r["op"], r["mode"]) for r in rows})
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.2 * max(len(panels), 1)), squeeze=False)
    for (op, mode), (ax_t, ax_m) in zip(panels, axes):
        sub = [r for r in rows if r["op"] == op and r["mode"] == mode]
        labels = list(dict.fromkeys(r["case"] for r in sub))
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = {r["case"]: r for r in sub if r["impl"] == impl}
            xs = [i for i, c in enumerate(labels) if c in pts]
            ax_t.plot(xs, [pts[labels[i]]["median_ms"] for i in xs], marker="o", label=impl)
            mem = [(i, pts[labels[i]].get("peak_extra_bytes")) for i in xs]
            mem = [(i, m / 2**20) for i, m in mem if m is not None]
            if mem:
                ax_m.plot([i for i, _ in mem], [m for _, m in mem], marker="o", label=impl)
        ax_t.set_yscale("log")
        ax_m.set_yscale("symlog", linthresh=MEMORY_LINEAR_MIB)
        for ax, what in ((ax_t, "median ms"), (ax_m, "peak extra MiB")):
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_title(f"{op} {mode}: {what}", fontsize=9)
            ax.grid(alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.suptitle(f"{data['environment']['device']} — {data['environment']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
