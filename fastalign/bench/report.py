"""Ratios, the plain-text table and the plot of benchmark results."""
from __future__ import annotations

from fastalign.bench.core import BASELINE, relative_spread


def speedup(r: dict):
    """Baseline time / time (``speedup_vs_eager`` in files recorded before baselines were per case)."""
    return r.get("speedup", r.get("speedup_vs_eager"))


def memory_ratio(r: dict):
    """Peak extra memory / the baseline's, both beyond the gradients every implementation returns."""
    return r.get("memory_ratio", r.get("memory_vs_eager"))


def add_ratios(results: list, limits: dict) -> None:
    """speedup = baseline time / time and memory_ratio = memory / baseline memory, same case and mode.

    A row's baseline is its case's (``row["baseline"]``, ``eager`` unless the case names another)."""
    by_key = {(r["op"], r["case"], r["mode"], r["impl"]): r for r in results if "median_ms" in r}
    for r in results:
        r.setdefault("baseline", BASELINE)
        b = by_key.get((r["op"], r["case"], r["mode"], r["baseline"]))
        if b is None or "median_ms" not in r:
            continue
        r["speedup"] = b["median_ms"] / r["median_ms"]
        if r.get("peak_extra_bytes") is not None and b.get("peak_extra_bytes"):
            req = r.get("required_bytes", 0)
            # memory beyond inputs and the gradients every implementation must return
            r["memory_ratio"] = max(r["peak_extra_bytes"] - req, 0) / max(b["peak_extra_bytes"] - req, 1)
        if "GBps" in r and limits.get("copy_GBps"):
            r["bandwidth_fraction"] = r["GBps"] / limits["copy_GBps"]
        if "TFLOPs" in r and limits.get("bf16_matmul_TFLOPs"):
            r["flops_fraction"] = r["TFLOPs"] / limits["bf16_matmul_TFLOPs"]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(data: dict) -> str:
    env, limits = data["environment"], data["device_limits"]
    lines = [f"fastalign-bench  {env['device']}  torch {env['torch']}  triton {env.get('triton')}  {env['date']}"]
    if limits:
        lines.append(f"device limits: copy {limits['copy_GBps']:.0f} GB/s, "
                     f"bf16 matmul {limits['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    cw = max([22] + [len(r["case"]) for r in data["results"]])
    head = f"{'op':18s} {'case':{cw}s} {'mode':8s} {'impl':14s} {'median ms':>10s} {'IQR %':>6s} {'speedup':>9s} " \
           f"{'extra MiB':>10s} {'mem ratio':>9s} {'% limit':>8s}  baseline"
    lines += [head, "-" * len(head)]
    foot = "IQR %: interquartile range of the timed runs / median; speedup: baseline time / time; extra MiB: peak memory beyond the inputs; mem ratio: to the " \
           "baseline's, after removing the gradients every implementation returns; % limit: of measured " \
           "copy bandwidth / matmul peak"
    for r in data["results"]:
        prefix = f"{r['op']:18s} {r['case']:{cw}s} {r['mode']:8s} {r['impl']:14s}"
        if "skipped" in r or "error" in r:
            lines.append(f"{prefix} {'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error']}")
            continue
        mem = r.get("peak_extra_bytes")
        frac = r.get("bandwidth_fraction", r.get("flops_fraction"))
        rel = relative_spread(r)  # None in files recorded before the spread was kept
        lines.append(
            f"{prefix} {r['median_ms']:10.2f} {_fmt(None if rel is None else 100 * rel, '6.0f'):>6s} "
            f"{_fmt(speedup(r), '8.2f') + 'x':>9s} "
            f"{_fmt(None if mem is None else mem / 2**20, '10.1f'):>10s} "
            f"{_fmt(memory_ratio(r), '9.3f'):>9s} {_fmt(None if frac is None else 100 * frac, '7.1f'):>8s}  "
            f"{r.get('baseline', BASELINE)}")
    lines += ["-" * len(head), foot]
    return "\n".join(lines)


def plot(data: dict, path: str) -> None:
    """Time and peak extra memory per case (x: tokens x vocab), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "median_ms" in r]
    panels = sorted({(r["op"], r["mode"]) for r in rows})
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
        for ax, what in ((ax_t, "median ms"), (ax_m, "peak extra MiB")):
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_yscale("log")
            ax.set_title(f"{op} {mode}: {what}", fontsize=9)
            ax.grid(alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.suptitle(f"{data['environment']['device']} — {data['environment']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
