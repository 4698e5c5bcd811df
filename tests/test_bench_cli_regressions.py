"""fastalign-bench's warnings about numbers it cannot vouch for, and `make gpu-check`'s offline setup."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastalign.bench import __main__ as cli
from fastalign.bench import core, report, summary

ROOT = Path(__file__).resolve().parents[1]


def _row(impl, median, runs, **extra):
    times = [median] * runs
    return {"op": "policy_loss", "case": "B=4 T=16", "mode": "fwd", "impl": impl, **core.spread(times), **extra}


def _data(results, **env):
    base = {"device": "CPU test, 2 cores", "torch": "x", "date": "d"}
    return {"environment": {**base, **env}, "device_limits": {}, "results": results}


def test_rows_timed_once_are_flagged_not_shown_as_an_unknown_spread():
    rows = [_row("fastalign", 1.0, 1), _row("eager", 3.0, 5)]
    assert "1 of 2 timed rows were timed once" in core.timed_once_warnings(rows)[0]
    line = next(ln for ln in report.table(_data(rows)).splitlines() if ln.startswith("policy_loss") and "fastalign" in ln)
    assert "1 run" in line
    assert core.timed_once_warnings([_row("eager", 3.0, 5)]) == []


def test_table_counts_the_rows_skipped_for_time():
    rows = [_row("eager", 3.0, 5), {"op": "clip_cov", "case": "c", "mode": "fwd", "impl": "fastalign",
                                    "skipped": core.OUT_OF_TIME},
            {"op": "clip_cov", "case": "c", "mode": "fwd", "impl": "liger", "skipped": "not installed"}]
    assert "1 of 3 rows skipped for time" in report.table(_data(rows))


def test_load_average_is_recorded_shown_and_oversubscription_warned(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 1.0, 1.0))
    env = core.environment(core.torch.device("cpu"))
    assert env["load_avg"] == 3.5 and env["cpu_cores"] == os.cpu_count()
    busy = {"cpu_cores": 2, "cpu_threads": 2, "load_avg": 0.5, "load_avg_after": 2.1}
    assert core.load_warnings({**busy, "load_avg": 0.5, "load_avg_after": 3.5})  # after: 3.5 - 2 own > 0 idle
    assert core.load_warnings({**busy, "load_avg": 0.5, "load_avg_after": None})  # before: 0.5 > 0 idle cores
    assert not core.load_warnings({"cpu_cores": 16, "cpu_threads": 4, "load_avg": 2.0, "load_avg_after": 5.0})
    # an idle machine's load average is seldom 0: a few hundredths before, the run's own threads after
    assert not core.load_warnings({**busy, "load_avg": 0.03, "load_avg_after": 2.2})
    assert not core.load_warnings({"device": "cuda", "load_avg": 50.0})  # GPU runs: no CPU threads recorded
    assert "load average 0.50 before the run, 2.10 after" in report.table(_data([], **busy))


def test_help_no_longer_claims_sustained_load_falls_on_all_alike():
    doc = cli.__doc__ + core.time_steps.__doc__
    assert "oversubscri" in doc and "load average" in cli.__doc__


def _gpu_check(*args, py, tmp_path):
    env = {**os.environ, "PY": str(py), "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_check_says_torch_is_missing(tmp_path):
    py = tmp_path / "python-without-site"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # no site-packages: no torch
    py.chmod(0o755)
    res = _gpu_check(py=py, tmp_path=tmp_path)
    assert res.returncode == 2 and "torch is not installed" in res.stderr


def test_gpu_check_deps_only_runs_without_a_gpu(tmp_path):
    recorded = set((ROOT / "benchmarks" / "results").glob("gpu-check-*"))  # the runs committed so far
    res = _gpu_check("--deps-only", py=sys.executable, tmp_path=tmp_path)
    # this environment has the test and build tools: nothing missing, nothing else run
    assert res.returncode == 0, res.stderr
    assert "everything the steps need is importable" in res.stdout
    assert set((ROOT / "benchmarks" / "results").glob("gpu-check-*")) == recorded


def test_profile_script_runs_on_the_cpu():
    """benchmarks/profile_linear.py (gpu-check's profile step) at a tiny size on the CPU: a table per op."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_linear.py"), "--device", "cpu",
                          "--tokens", "16", "--rows", "2", "--hidden", "8", "--vocab", "32", "--steps", "1",
                          "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for name in ("==== linear_logprobs forward + backward: N=16 H=8 V=32", "==== LinearPolicyLoss grpo"):
        assert name in res.stdout, res.stdout
    assert "fastalign::linear_stats" in res.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_linear.py"), "--tokens", "15",
                          "--rows", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--tokens (15) must be a multiple of --rows (2)" in bad.stderr


def test_gpu_peers_downloads_the_build_and_test_tools():
    """``make gpu-peers`` and gpu_check.sh read the same two lists of wheels."""
    res = subprocess.run(["make", "-n", "gpu-peers"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for arg in ("-r benchmarks/gpu_tools.txt", "--no-deps", "-r benchmarks/gpu_peers.txt", "--python-version 3.12",
                "manylinux"):
        assert arg in res.stdout, arg
    tools = (ROOT / "benchmarks" / "gpu_tools.txt").read_text()
    for name in ("hypothesis==", "pytest==", "pytest-benchmark==", "scikit-build-core==", "pybind11==", "ninja==",
                 "cmake=="):
        assert f"\n{name}" in tools, name
    peers = (ROOT / "benchmarks" / "gpu_peers.txt").read_text()
    for name in ("liger-kernel==", "cut-cross-entropy==", "trl=="):
        assert f"\n{name}" in peers, name
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "requirements gpu_tools.txt" in script and "requirements gpu_peers.txt" in script


def test_recorded_markdown_shows_the_load_and_the_rows_timed_once():
    data = _data([_row("fastalign", 1.0, 1), _row("eager", 3.0, 5)], fastalign="0", python="3", command="c",
                 cpu_cores=2, cpu_threads=2, load_avg=1.5, load_avg_after=3.0)
    text = summary.markdown(data)
    assert "Load average 1.50 before the run, 3.00 after." in text
    assert "the CPU was oversubscribed" in text and "1 of 2 timed rows were timed once" in text
    assert "| 1.00 | 1 run |" in text


def test_lm_head_tilings_script_runs_on_the_cpu():
    """benchmarks/lm_head_tilings.py in the interpreter: the forward and every product, with every tiling, equal
    torch's results."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_head_tilings.py"), "--device", "cpu",
                          "--tokens", "12", "--rows", "8", "--hidden", "16", "--vocab", "48", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [(ln[:24].strip(), ln[25:67].strip(), ln.split()[-1]) for ln in res.stdout.splitlines()[2:]]
    kernels = ["forward log-probs", "logits = h @ W.T", "dh = dz @ W", "dW += dz.T @ h (fp32)"]
    assert [r[0] for r in rows] == [k for k in kernels for _ in range(3)], res.stdout  # torch, default, candidate
    for kernel, tiling, diff in rows:
        if not tiling.startswith("torch.mm"):
            assert float(diff) < 1e-5, (kernel, tiling, diff)


def test_readme_table_skips_a_record_without_an_environment(tmp_path):
    """A JSON record with results but no environment (not a fastalign-bench run) is skipped by the README table,
    as one without results is; it raised a KeyError."""
    record = tmp_path / "results-only.json"
    record.write_text('{"results": []}')
    assert summary.readme_table([str(record)]).count("\n") == 1  # the header alone
