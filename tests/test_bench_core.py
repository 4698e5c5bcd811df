"""Scheduling and statistics of the benchmark runner, driven by a fake clock (no real timings), and its
command line on fake runs and tiny cases."""
import json
import logging
import re
import statistics
import warnings

import pytest
import torch

from fastalign.bench import core, report

CPU = torch.device("cpu")


class FakeClock:
    """A clock that only moves when a step says so; every step call is logged in order."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def __call__(self):
        return self.now

    def step(self, name, durations):
        """A step advancing the clock by the next of ``durations`` (seconds; the last one repeats)."""
        seq = list(durations)

        def run():
            self.calls.append(name)
            self.now += seq.pop(0) if len(seq) > 1 else seq[0]
        return run


def test_repetitions_are_interleaved_after_per_candidate_warmup():
    clock = FakeClock()
    steps = {n: clock.step(n, [0.01]) for n in ("A", "B", "C")}
    out = core.time_steps(steps, CPU, repeats=4, budget_s=100.0, clock=clock)
    warm, rounds = clock.calls[:3], clock.calls[3:]
    assert warm == ["A", "B", "C"]
    assert len(rounds) % 3 == 0 and len(rounds) >= 12
    assert rounds == ["A", "B", "C"] * (len(rounds) // 3)
    assert {n: r["runs"] for n, r in out.items()} == {n: len(rounds) // 3 for n in "ABC"}
    assert list(out) == ["A", "B", "C"]


def test_a_burst_of_load_hits_every_candidate():
    # the machine is busy during the second round only: each candidate sees one slow run
    clock = FakeClock()
    steps = {"A": clock.step("A", [0.01, 0.01, 0.5, 0.01]), "B": clock.step("B", [0.02, 0.02, 1.0, 0.02])}
    out = core.time_steps(steps, CPU, repeats=3, budget_s=100.0, clock=clock)
    assert out["A"]["median_ms"] == pytest.approx(10.0)
    assert out["B"]["median_ms"] == pytest.approx(20.0)
    assert out["B"]["median_ms"] / out["A"]["median_ms"] == pytest.approx(2.0)


def test_budget_stops_rounds_but_keeps_two():
    clock = FakeClock()
    steps = {"A": clock.step("A", [0.5]), "B": clock.step("B", [0.5])}
    out = core.time_steps(steps, CPU, repeats=100, budget_s=1.5, clock=clock)
    # each round takes 1 s: after round 2 the 1.5 s budget is spent
    assert out["A"]["runs"] == out["B"]["runs"] == 2


def test_one_round_when_a_round_outlasts_the_budget():
    clock = FakeClock()
    steps = {"A": clock.step("A", [0.01]), "slow": clock.step("slow", [5.0])}
    out = core.time_steps(steps, CPU, repeats=10, budget_s=2.0, clock=clock)
    assert out["A"]["runs"] == out["slow"]["runs"] == 1
    assert core.relative_spread(out["A"]) is None  # no spread from one run


def test_a_slow_warmup_does_not_cut_the_rounds():
    # a compiling baseline: 30 s to warm up, then fast
    clock = FakeClock()
    steps = {"A": clock.step("A", [0.01]), "compiled": clock.step("compiled", [30.0, 0.01])}
    out = core.time_steps(steps, CPU, repeats=5, budget_s=2.0, clock=clock)
    assert out["A"]["runs"] == out["compiled"]["runs"] >= 5
    assert out["compiled"]["median_ms"] == pytest.approx(10.0)


def test_a_failing_candidate_is_dropped_and_reported():
    clock = FakeClock()
    count = {"n": 0}

    def flaky():
        count["n"] += 1
        clock.calls.append("F")
        clock.now += 0.01
        if count["n"] == 3:  # warm-up and first round pass, second round raises
            raise RuntimeError("boom")

    def broken():
        raise ValueError("no")

    out = core.time_steps({"A": clock.step("A", [0.01]), "F": flaky, "X": broken}, CPU, repeats=5,
                          budget_s=100.0, clock=clock)
    assert out["F"] == {"error": "RuntimeError: boom"}
    assert out["X"] == {"error": "ValueError: no"}
    assert out["A"]["runs"] >= 5
    assert list(out) == ["A", "F", "X"]
    with pytest.raises(RuntimeError, match="ValueError: no"):
        core.time_step(broken, CPU, 2, 1.0)


def test_spread_quartiles():
    s = core.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_ms"], s["p25_ms"], s["p75_ms"], s["iqr_ms"], s["min_ms"], s["runs"]) == (3, 2, 4, 2, 1, 5)
    times = [0.3, 7.0, 1.5, 2.25, 9.0, 4.0, 4.0, 0.1]
    s = core.spread(times)
    q = statistics.quantiles(times, n=4, method="inclusive")
    assert s["p25_ms"] == q[0] and s["p75_ms"] == q[2] and s["iqr_ms"] == pytest.approx(q[2] - q[0])
    assert s["p25_ms"] <= s["median_ms"] <= s["p75_ms"]
    one = core.spread([2.5])
    assert one["iqr_ms"] == 0 and one["median_ms"] == one["p25_ms"] == one["p75_ms"] == 2.5
    with pytest.raises(ValueError, match="times_ms"):
        core.spread([])


def _row(impl, median, iqr, runs=5):
    return {"op": "policy_loss", "case": "4x8", "mode": "fwd", "impl": impl, "median_ms": median,
            "iqr_ms": iqr, "runs": runs}


def test_wide_spread_warning_trigger():
    rows = [_row("eager", 10.0, 2.5), _row("fastalign", 10.0, 2.6), {"op": "x", "case": "c", "mode": "fwd",
                                                                      "impl": "y", "skipped": "n/a"}]
    lines = core.spread_warnings(rows)
    assert len(lines) == 1 and "fastalign" in lines[0] and "26%" in lines[0] and "--repeats" in lines[0]
    assert core.spread_warnings(rows, threshold=0.1) and len(core.spread_warnings(rows, threshold=0.1)) == 2
    assert core.spread_warnings([_row("eager", 10.0, 1.0)]) == []
    assert core.relative_spread({"median_ms": 1.0}) is None  # recorded before the spread was kept
    assert core.spread_warnings([_row("eager", 10.0, 9.0, runs=1)]) == []


def test_table_shows_the_spread():
    data = {"environment": {"device": "CPU", "torch": "t", "date": "d"}, "device_limits": {},
            "results": [_row("eager", 10.0, 2.0), _row("fastalign", 2.0, 0.1)]}
    report.add_ratios(data["results"], {})
    text = report.table(data)
    assert "IQR %" in text
    line = next(ln for ln in text.splitlines() if ln.split()[3:4] == ["fastalign"])
    assert line.split()[4:7] == ["2.00", "5", "5.00x"]


def test_table_columns_line_up_with_a_long_op_name():
    rows = [_row("eager", 10.0, 2.0), dict(_row("fastalign", 2.0, 0.1), op="linear_cross_entropy")]
    data = {"environment": {"device": "CPU", "torch": "t", "date": "d"}, "device_limits": {}, "results": rows}
    report.add_ratios(data["results"], {})
    lines = report.table(data).splitlines()
    head = next(ln for ln in lines if ln.startswith("op "))
    for row in (ln for ln in lines if ln.startswith(("policy_loss", "linear_cross_entropy"))):
        assert row.index(" 4x8 ") == head.index(" case "), (head, row)


def test_quiet_third_party_keeps_fastalign_warnings_and_errors():
    logger = logging.getLogger("torch._dynamo")
    before = logger.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with core.quiet_third_party():
            assert logger.getEffectiveLevel() == logging.ERROR
            warnings.warn_explicit("third-party", UserWarning, "x.py", 1, module="torch._dynamo.convert_frame")
            warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="fastalign.bench.core")
            # a baseline's deprecation, reported from the bench case that calls it
            warnings.warn_explicit("deprecated", FutureWarning, "z.py", 1, module="fastalign.bench.cases.x")
        assert logger.level == before
    assert [str(w.message) for w in caught] == ["ours"]
    with pytest.raises(ValueError, match="still raised"):
        with core.quiet_third_party():
            raise ValueError("still raised")


def test_case_budget_shares_what_is_left():
    assert core.case_budget(4.0, None, 10) == 4.0
    assert core.case_budget(4.0, 200.0, 10) == 4.0           # 0.5 * 20 s share > 4 s cap
    assert core.case_budget(4.0, 20.0, 10) == pytest.approx(1.0)
    assert core.case_budget(4.0, -5.0, 3) == 0.2              # overrun: the floor, never negative
    with pytest.raises(ValueError, match="cases_left"):
        core.case_budget(4.0, 10.0, 0)


def test_markdown_shows_the_spread():
    from fastalign.bench import summary

    data = {"environment": {"device": "CPU", "torch": "t", "date": "d", "fastalign": "f", "python": "p",
                            "command": "c"}, "device_limits": {},
            "results": [_row("eager", 10.0, 3.0), {"op": "policy_loss", "case": "4x8", "mode": "fwd",
                                                   "impl": "old", "median_ms": 1.0}]}
    text = summary.markdown(data)
    assert "| IQR % |" in text
    assert "| eager | 10.00 | 30 |" in text and "| old | 1.00 | - |" in text


def test_deadline_skips_warmups_that_would_start_after_it():
    clock = FakeClock()
    steps = {n: clock.step(n, [3.0]) for n in ("A", "B", "C")}
    deadline = core.Deadline(5.0, clock=clock)
    out = core.time_steps(steps, CPU, repeats=2, budget_s=100.0, clock=clock, deadline=deadline)
    assert clock.calls[:2] == ["A", "B"] and "C" not in clock.calls  # B's warm-up ends at 6 s > 5 s
    assert "median_ms" in out["A"] and "median_ms" in out["B"]
    assert out["C"] == {"skipped": core.OUT_OF_TIME}
    assert core.Deadline(None).left() is None and not core.Deadline(0).passed()


def test_roofline_takes_the_binding_limit():
    limits = {"copy_GBps": 100.0, "matmul_TFLOPs": {"fp32": 2.0, "bf16": 10.0}}
    # 1 GB at 100 GB/s = 10 ms; 10 GFLOP at 2 TFLOP/s = 5 ms: memory binds
    assert core.roofline_ms({"bytes": 1e9, "flops": 1e10, "dtype": "fp32"}, limits) == (pytest.approx(10.0), "memory")
    # 100 GFLOP at 10 TFLOP/s (bf16) = 10 ms beats 1 ms of traffic: compute binds
    assert core.roofline_ms({"bytes": 1e8, "flops": 1e11, "dtype": "bf16"}, limits) == (pytest.approx(10.0), "compute")
    assert core.roofline_ms({"flops": 1e11, "dtype": "fp16"}, limits) is None  # rate not measured
    assert core.roofline_ms({"median_ms": 1.0}, limits) is None


def test_table_fills_percent_of_limit_and_the_work_model():
    rows = [dict(_row("eager", 40.0, 1.0), bytes=1e9, dtype="fp32"),
            dict(_row("fastalign", 20.0, 1.0), bytes=1e9, dtype="fp32"),
            {"op": "policy_loss", "case": "4x8", "mode": "fwd", "impl": "late", "skipped": core.OUT_OF_TIME},
            dict(_row("other", 20.0, 1.0), memory_skipped="the run's time budget was spent")]
    data = {"environment": {"device": "CPU", "torch": "t", "date": "d"},
            "device_limits": {"copy_GBps": 100.0, "matmul_TFLOPs": {"fp32": 1.0}}, "results": rows}
    report.add_ratios(rows, data["device_limits"])
    assert rows[1]["limit_fraction"] == pytest.approx(0.5) and rows[0]["limit_fraction"] == pytest.approx(0.25)
    text = report.table(data)
    line = next(ln for ln in text.splitlines() if ln.split()[3:4] == ["fastalign"])
    assert line.split()[-2] == "50.0"
    assert "copy 100.0 GB/s, fp32 matmul 1.00 TFLOP/s" in text
    assert "1 GB -> at least 10 ms (memory-bound); fastalign at 50.0% of it" in text
    assert "peak memory not measured for 1 rows" in text and "skipped: the run's time budget" in text


def test_cpu_device_limits_are_measured():
    limits = core.device_limits(CPU, {"fp32"}, budget_s=0.5)
    assert limits["copy_GBps"] > 0.1 and limits["matmul_TFLOPs"]["fp32"] > 1e-3
    assert set(limits["matmul_TFLOPs"]) == {"fp32"}


def test_cli_run_within_a_total_budget(tmp_path, capsys):
    from fastalign.bench.__main__ import main

    out = tmp_path / "run.json"
    assert main(["--quick", "--ops", "group_advantages", "--no-compile", "--no-memory", "--repeats", "1",
                 "--budget", "0.1", "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    ours = next(r for r in data["results"] if r["impl"] == "fastalign")
    assert ours["median_ms"] > 0 and 0 < ours["limit_fraction"] and ours["bound"] == "memory"
    assert data["device_limits"]["copy_GBps"] > 0
    assert "fastalign at" in capsys.readouterr().out
    # a budget spent before the first case: every row says so, nothing is built or timed
    assert main(["--quick", "--ops", "group_advantages", "--total-budget", "1e-9", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    from fastalign.bench.__main__ import NOT_RUN

    ran = [r for r in data["results"] if r["skipped"] != NOT_RUN]  # a peer not installed here is not run at all
    assert ran and all(r["skipped"] == core.OUT_OF_TIME for r in ran)


def test_cli_json_keeps_the_cases_done_when_the_run_is_killed(tmp_path, monkeypatch):
    """--json was written at the end only: a run killed by a time limit (gpu-check's steps) left nothing. It is
    written after every case, marked partial until the end; the cases run in the order --ops names them."""
    import json

    from fastalign.bench import __main__ as bench, summary

    out = tmp_path / "run.json"
    seen = []
    real = bench.measure_case

    def measure_then_read_the_file(case, mode, *args, **kwargs):
        if seen:  # the cases before this one are in the file already
            data = json.loads(out.read_text())
            assert data["partial"] is True and {(r["op"], r["mode"]) for r in data["results"]} >= set(seen[:1])
        seen.append((case.op, mode))
        return real(case, mode, *args, **kwargs)

    monkeypatch.setattr(bench, "measure_case", measure_then_read_the_file)
    assert bench.main(["--quick", "--ops", "policy_loss,group_advantages", "--cases", "B=65536,clip_cov",
                       "--modes", "fwd", "--no-compile", "--no-memory", "--repeats", "1", "--budget", "0.05",
                       "--json", str(out)]) == 0
    assert [op for op, _ in seen] == ["policy_loss", "group_advantages"]
    data = json.loads(out.read_text())
    assert "partial" not in data and len({r["op"] for r in data["results"]}) == 2
    assert "commit" in data["environment"]
    assert "A partial run" in summary.markdown({**data, "partial": True})


def test_best_limits_keeps_the_higher_of_two_measurements():
    a = {"copy_GBps": 10.0, "matmul_TFLOPs": {"fp32": 0.1, "bf16": 0.5}}
    b = {"copy_GBps": 12.0, "matmul_TFLOPs": {"fp32": 0.05}}
    assert core.best_limits(a, b) == {"copy_GBps": 12.0, "matmul_TFLOPs": {"fp32": 0.1, "bf16": 0.5}}


def test_readme_table_shows_the_newest_run_of_a_case(tmp_path):
    from fastalign.bench import summary

    def record(name, date, ms, device="CPU"):
        row = {"op": "linear_logprobs", "case": "4x8", "mode": "fwd", "impl": "fastalign", "median_ms": ms,
               "baseline": "eager"}
        path = tmp_path / name
        path.write_text(json.dumps({"environment": {"device": device, "date": date}, "results": [row]}))
        return str(path)

    files = [record("b.json", "2026-11-30T10:00", 2.0), record("a.json", "2026-11-24T10:00", 1.0),
             record("c.json", "2026-11-20T10:00", 3.0, device="GPU")]
    table = summary.readme_table(files)
    assert "| 2.00 |" in table and "| 1.00 |" not in table and "| 3.00 |" in table


def test_linear_logprobs_peers_run_on_cuda_only(monkeypatch):
    """Liger's fused cross-entropy and cut-cross-entropy are Triton GPU kernels: off CUDA they are skipped, never
    built and timed into an error row (as if installed here: a stand-in is importable)."""
    from fastalign.bench.cases import linear_logprobs

    class Peer:
        def __init__(self, **kw):
            pass

    monkeypatch.setattr(linear_logprobs, "optional_impl", lambda module, *names: (Peer,))
    impls = linear_logprobs._make_build(8, 16, 64, torch.float32)(CPU, "fwd")
    assert impls["liger (CE)"] is None and impls["cut-cross-entropy"] is None and impls["fastalign"] is not None
    peers = linear_logprobs._peers(torch.device("cuda"))
    assert isinstance(peers["liger (CE)"], Peer) and peers["cut-cross-entropy"] is Peer


def test_repeats_is_a_floor_and_its_help_says_so():
    from fastalign.bench.__main__ import build_parser

    clock = FakeClock()
    out = core.time_steps({"A": clock.step("A", [0.01])}, CPU, repeats=3, budget_s=100.0, clock=clock)
    assert out["A"]["runs"] > 3  # fast steps run until a second has passed
    text = " ".join(build_parser().format_help().split())
    assert "--repeats REPEATS timed runs per step: at least this many" in text


def test_linear_cross_entropy_case_implementations_agree():
    """The SFT-loss case's implementations compute one loss, forward and with their backward (its tiny warmup
    shape on the CPU; the gradients of both fastalign paths are tested against float64 elsewhere)."""
    from fastalign.bench.cases.linear_cross_entropy import _make_build

    for mode in ("fwd", "fwd+bwd"):
        losses = {impl: step().detach() for impl, step in _make_build(64, 16, 97, torch.float32)(
            torch.device("cpu"), mode).items() if step is not None}
        assert {"fastalign", "fastalign-two-pass", "eager"} <= set(losses)
        for impl, value in losses.items():
            torch.testing.assert_close(value, losses["eager"], rtol=1e-5, atol=1e-6, msg=lambda m: f"{impl}: {m}")


def test_linear_topk_case_implementations_agree():
    """The top-k distillation case's implementations compute one loss, forward and with their backward (a tiny
    shape; linear_topk_logprobs is tested against float64 and TRL elsewhere)."""
    from fastalign.bench.cases.linear_topk import _make_build

    for mode in ("fwd", "fwd+bwd"):
        losses = {impl: step().detach() for impl, step in _make_build(64, 16, 24, 97, torch.float32, k=7)(
            torch.device("cpu"), mode).items() if step is not None}
        assert {"fastalign", "eager"} <= set(losses)
        for impl, value in losses.items():
            torch.testing.assert_close(value, losses["eager"], rtol=1e-5, atol=1e-6, msg=lambda m: f"{impl}: {m}")


# ----------------------------------------------------------------------------- the command line


def _usage_error(capsys, argv) -> str:
    from fastalign.bench.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    (["--modes", "fwd_bwd"], ["--modes", "fwd_bwd", "fwd+bwd"]),
    (["--quick", "--ops", "group_advantages", "--modes", "fwd+bwd"], ["--modes", "fwd+bwd"]),  # its cases: fwd only
    (["--quick", "--ops", "group_advantages", "--cases", "B=65536 groups of 61"], ["--cases", "B=65536 groups of 61"]),
    (["--ops", "policy_loss", "--cases", "clip_cov,no_such_case"], ["--cases", "no_such_case"]),
    (["--ops", "policy_loss, no_such_op"], ["--ops", "no_such_op"]),
    (["--quick", "--ops", "linear_policy_loss,policy_loss"], ["--ops", "linear_policy_loss", "--quick"]),
    (["--device", "gpu"], ["--device", "gpu"]),
    (["--repeats", "-3"], ["--repeats"]),
    (["--repeats", "0"], ["--repeats"]),
    (["--budget", "-1"], ["--budget"]),
    (["--budget", "0"], ["--budget"]),
    (["--total-budget", "-5"], ["--total-budget"]),
    (["--total-budget", "inf"], ["--total-budget", "finite"]),  # was taken, then every row an OverflowError
    (["--total-budget", "nan"], ["--total-budget"]),
    (["--budget", "inf"], ["--budget", "finite"]),
    (["--cases", " , "], ["--cases"]),
    (["--overwrite"], ["--overwrite", "--record"]),  # was ignored
    # an op or a substring with no case in the modes asked for was dropped while the others ran
    (["--quick", "--ops", "group_advantages,token_logprobs", "--modes", "fwd+bwd"], ["--ops", "group_advantages"]),
    (["--cases", "B=65536,4096x32000", "--modes", "fwd+bwd"], ["--cases", "B=65536"]),
    (["--plot", "out.txt"], ["--plot", ".png"]),  # matplotlib refused it after the whole run
    (["--plot", "out"], ["--plot", ".png"]),  # written as out.png, reported as out
    (["--json", ""], ["--json"]),  # ignored
    (["--record", ""], ["--record"]),
])
def test_cli_refuses_values_that_select_nothing_or_make_no_sense(capsys, argv, names):
    err = _usage_error(capsys, argv)
    for name in names:
        assert name in err, err


@pytest.mark.parametrize("option, where", [("--json", "missing/x.json"), ("--plot", "missing/x.png"),
                                           ("--json", "."), ("--record", "a_file"), ("--record", "a_file/sub")])
def test_cli_refuses_output_paths_before_the_run(tmp_path, monkeypatch, capsys, option, where):
    """An output the run could not write at its end is a usage error before anything is measured."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    err = _usage_error(capsys, ["--ops", "group_advantages", option, where])
    assert f"argument {option}: cannot write" in err and where in err, err


def test_a_late_write_error_loses_no_result(tmp_path, monkeypatch, capsys):
    """An output that cannot be written when the run ends (its directory removed meanwhile) is reported, not
    raised: the other outputs are written, and JSON results with nowhere to go are kept in a temporary file."""
    import os
    import shutil

    from fastalign.bench import __main__ as bench

    env = {"device": "CPU Test", "date": "2026-12-01T10:00:00+00:00", "torch": "t", "triton": None,
           "fastalign": "f", "python": "p", "command": "fastalign-bench"}
    monkeypatch.setattr(core, "environment", lambda device: dict(env))
    gone = tmp_path / "gone"

    def run_then_lose_the_directory(args, env, on_case=None):
        shutil.rmtree(gone)
        return _fake_run(True)(args, env)

    monkeypatch.setattr(bench, "run", run_then_lose_the_directory)
    rec = tmp_path / "rec"
    gone.mkdir()
    assert bench.main(["--ops", "policy_loss", "--record", str(rec), "--json", str(gone / "x.json")]) == 1
    out = capsys.readouterr()
    assert "argument --json: cannot write" in out.err and "Traceback" not in out.err
    assert len(list(rec.glob("*.json"))) == 1 and len(list(rec.glob("*.md"))) == 1
    gone.mkdir()
    assert bench.main(["--ops", "policy_loss", "--json", str(gone / "x.json")]) == 1
    kept = re.search(r"the results are in (\S+) instead", capsys.readouterr().err).group(1)
    try:
        assert json.load(open(kept))["results"][0]["median_ms"] == 1.0
    finally:
        os.remove(kept)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cli_refuses_cuda_without_a_device(capsys):
    assert "--device" in _usage_error(capsys, ["--device", "cuda"])


def test_cli_strips_list_items_and_keeps_zero_total_budget():
    from fastalign.bench.__main__ import parse_args, selected_cases

    args = parse_args(["--ops", "policy_loss, token_logprobs", "--cases", "clip_cov, 4096x32000", "--modes",
                       "fwd, fwd+bwd", "--total-budget", "0", "--device", "cpu"])
    assert args.ops == ["policy_loss", "token_logprobs"] and args.cases == ["clip_cov", "4096x32000"]
    assert args.modes == ["fwd", "fwd+bwd"] and args.total_budget == 0.0 and args.device_type == "cpu"
    assert {c.op for c in selected_cases(args, "cpu")} == {"policy_loss", "token_logprobs"}


def test_list_shows_what_a_run_would_select(capsys):
    from fastalign.bench.__main__ import main

    assert main(["--list", "--ops", "group_advantages", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(ln.startswith("group_advantages") and " quick " in ln for ln in lines)
    assert main(["--list", "--ops", "policy_loss", "--device", "cuda"]) == 0  # listing needs no device
    out = capsys.readouterr().out
    assert "clip_cov" in out and "beside a busy core" not in out  # those cases are CPU-only
    assert main(["--list", "--ops", "policy_loss", "--device", "cpu", "--cases", "busy"]) == 0
    assert all("beside a busy core" in ln for ln in capsys.readouterr().out.splitlines())


def _args(**kw):
    import argparse

    return argparse.Namespace(**{"quick": False, "ops": None, "cases": None, "modes": ["fwd", "fwd+bwd"],
                                 "record": "out", **kw})


def test_rows_that_could_never_run_are_not_counted_out_of_time(monkeypatch):
    """Once the run's time is spent, a case's rows are skipped without building it: a torch.compile row under
    --no-compile and a third-party row whose package is missing say so, as when they are built; they were counted
    among the rows skipped for time."""
    from fastalign.bench import optional
    from fastalign.bench.__main__ import NOT_RUN, measure_case
    from fastalign.bench.cases import all_cases

    monkeypatch.setitem(optional.COMPILE, "enabled", False)
    monkeypatch.setitem(optional.PACKAGES, "verl", "no_such_package_here")
    case = next(c for c in all_cases() if c.op == "group_advantages" and "verl" in c.impls)
    spent = core.Deadline(1.0, clock=iter([0.0, 5.0, 5.0, 5.0]).__next__)
    rows = {r["impl"]: r["skipped"] for r in measure_case(case, "fwd", torch.device("cpu"), 1, 0.1, deadline=spent)}
    assert rows["torch.compile"] == rows["verl"] == NOT_RUN
    assert rows["fastalign"] == rows["eager"] == core.OUT_OF_TIME


def test_record_stem_names_every_selection():
    from fastalign.bench.__main__ import MAX_CASES_NAME, record_stem

    env = {"device": "CPU AMD EPYC, 2 cores", "date": "2026-12-01T10:00:00+00:00"}
    assert record_stem(_args(quick=True), env) == "out/cpu-amd-epyc-2-cores-2026-12-01-quick"
    assert record_stem(_args(ops=["token_logprobs", "policy_loss"]), env).endswith(
        "-2026-12-01-full-policy_loss-token_logprobs")
    one = record_stem(_args(ops=["policy_loss"], cases=["clip_cov"]), env)
    other = record_stem(_args(ops=["policy_loss"], cases=["ppo"]), env)
    assert one.endswith("-full-policy_loss-cases-clip_cov") and other.endswith("-cases-ppo")
    assert record_stem(_args(cases=["B=8 T=256", "LoRA"]), env) == record_stem(_args(cases=["LoRA", "B=8 T=256"]), env)
    assert record_stem(_args(modes=["fwd+bwd"]), env).endswith("-full-fwd+bwd")
    # selections whose names differ only in the characters a file name replaces: one file each (they met)
    assert record_stem(_args(cases=["512x512/768x32000"]), env) != record_stem(_args(cases=["512x512", "768x32000"]),
                                                                               env)
    long = [f"4096x1024x{v} fp32 LoRA" for v in (32000, 152064, 151936)]
    name = record_stem(_args(cases=long), env).split("-cases-")[1]
    assert len(name) <= MAX_CASES_NAME and name != record_stem(_args(cases=long[:2]), env).split("-cases-")[1]


def _fake_run(timed: bool, peak=0):
    row = {"op": "policy_loss", "case": "clip_cov B=256 T=1024", "mode": "fwd", "impl": "fastalign",
           "baseline": "eager"}
    if timed:
        row.update(median_ms=1.0, iqr_ms=0.1, runs=3, peak_extra_bytes=peak)
    else:
        row["skipped"] = core.OUT_OF_TIME
    return lambda args, env, on_case=None: {"environment": env, "device_limits": {}, "results": [dict(row)]}


def test_record_never_overwrites_and_cites_the_json_it_writes(tmp_path, monkeypatch, capsys):
    import os

    from fastalign.bench import __main__ as bench

    env = {"device": "CPU Test", "date": "2026-12-01T10:00:00+00:00", "torch": "t", "triton": None,
           "fastalign": "f", "python": "p", "command": "fastalign-bench"}
    monkeypatch.setattr(core, "environment", lambda device: dict(env))
    monkeypatch.setattr(bench, "run", _fake_run(True))
    rec, mine = tmp_path / "rec", tmp_path / "mine.json"
    argv = ["--ops", "policy_loss", "--cases", "clip_cov", "--record", str(rec)]
    assert bench.main(argv + ["--json", str(mine)]) == 0
    stem = rec / "cpu-test-2026-12-01-full-policy_loss-cases-clip_cov"
    assert all(os.path.exists(f"{stem}{ext}") for ext in (".json", ".md", ".png")) and mine.exists()
    cited = re.search(r"file `([^`]+)`", open(f"{stem}.md").read()).group(1)
    assert (rec / cited).exists()  # relative to the markdown's directory
    before = open(f"{stem}.json").read()
    with pytest.raises(SystemExit) as e:  # the same selection on the same day
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--record" in err and "--overwrite" in err and open(f"{stem}.json").read() == before
    assert bench.main(argv + ["--overwrite"]) == 0
    assert bench.main(["--ops", "policy_loss", "--cases", "ppo", "--record", str(rec)]) == 0
    assert (rec / "cpu-test-2026-12-01-full-policy_loss-cases-ppo.json").exists()
    # a run that timed nothing records nothing, and no plot is attempted
    monkeypatch.setattr(bench, "run", _fake_run(False))
    capsys.readouterr()
    assert bench.main(["--ops", "policy_loss", "--record", str(rec), "--plot", str(tmp_path / "x.png")]) == 1
    assert "no row was timed" in capsys.readouterr().err
    assert not list(rec.glob("cpu-test-2026-12-01-full-policy_loss.*")) and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("option", ["--plot", "--record"])
def test_a_plot_without_matplotlib_is_a_usage_error(capsys, monkeypatch, tmp_path, option):
    """--plot (and --record, which plots too) without matplotlib installed: refused before the run, naming what
    to install (it failed at the run's end, after every case)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    where = str(tmp_path / ("out.png" if option == "--plot" else "results"))
    err = _usage_error(capsys, ["--ops", "group_advantages", option, where])
    assert option in err and "matplotlib" in err and "fastalign[bench]" in err


def test_plot_of_no_timed_row_writes_nothing_and_keeps_a_zero_peak(tmp_path):
    env = {"device": "CPU", "date": "d"}
    assert report.plot({"environment": env, "results": _fake_run(False)(None, env)["results"]},
                       str(tmp_path / "none.png")) is False
    assert not (tmp_path / "none.png").exists()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {}
    save = plt.Figure.savefig

    def savefig(fig, path, **kw):  # the memory panel draws the 0-byte point
        shown["memory"] = [list(line.get_ydata()) for line in fig.axes[1].get_lines()]
        shown["scale"] = fig.axes[1].get_yscale()
        return save(fig, path, **kw)

    try:
        plt.Figure.savefig = savefig
        assert report.plot(_fake_run(True, peak=0)(None, env), str(tmp_path / "zero.png")) is True
    finally:
        plt.Figure.savefig = save
    assert (tmp_path / "zero.png").exists() and shown == {"memory": [[0.0]], "scale": "symlog"}


def test_recorded_command_reruns_as_written(monkeypatch):
    import shlex

    monkeypatch.setattr("sys.argv", ["fastalign-bench", "--ops", "policy_loss", "--cases", "clip_cov B=256"])
    command = core.environment(CPU)["command"]
    assert shlex.split(command) == ["fastalign-bench", "--ops", "policy_loss", "--cases", "clip_cov B=256"]


def _tiny_case(log):
    """A case whose steps (and their warm-ups) log their calls."""
    def build(device, mode):
        return {impl: (lambda impl=impl: log.append(impl)) for impl in ("fastalign", "liger", "torch.compile")}

    def warmup(device, mode):
        return {impl: (lambda impl=impl: log.append(f"warm {impl}")) for impl in ("fastalign", "liger",
                                                                                  "torch.compile")}
    return core.Case(op="x", label="tiny", params={}, build=build, warmup=warmup,
                     impls=("fastalign", "liger", "torch.compile"))


def test_memory_probe_measures_a_compiled_step_after_it_compiled(monkeypatch):
    """A compiling implementation runs once at the measured shape before the measurement (its first call there
    compiles); other implementations are measured at their first call, as before."""
    from fastalign.bench import _memprobe

    assert isinstance(_memprobe.frames_compiled(), int)
    log = []
    case = _tiny_case(log)
    monkeypatch.setattr(_memprobe, "find_case", lambda key: case)
    # the liger warm-up compiles a frame (a library compiling its own code); fastalign's does not
    monkeypatch.setattr(_memprobe, "frames_compiled", lambda: sum(e == "warm liger" for e in log))

    def measure(step):
        calls_before = list(log)
        step()
        return calls_before

    for impl, runs_before in (("fastalign", 0), ("liger", 1), ("torch.compile", 1)):
        log.clear()
        seen = _memprobe.peak_bytes({"case": "x/tiny", "mode": "fwd", "impl": impl}, measure)
        assert seen == [f"warm {impl}"] + [impl] * runs_before, (impl, seen)


def test_memory_probe_follows_no_compile(monkeypatch):
    from fastalign.bench import _memprobe, optional

    specs = []

    def fake_run(cmd, **kw):
        specs.append(json.loads(cmd[-1]))
        return type("Done", (), {"returncode": 0, "stdout": "123\n", "stderr": ""})()

    monkeypatch.setattr(core.subprocess, "run", fake_run)
    monkeypatch.setitem(optional.COMPILE, "enabled", False)
    case = _tiny_case([])
    assert core.measure_cpu_memory_subprocess(case, "fwd", "liger") == 123
    assert specs == [{"case": "x/tiny", "mode": "fwd", "impl": "liger", "compile": False}]
    # the probe process switches its compiled baselines as the spec says before building the case
    monkeypatch.setattr(_memprobe, "find_case", lambda key: (specs.append(optional.COMPILE["enabled"]), case)[1])
    monkeypatch.setitem(optional.COMPILE, "enabled", True)
    _memprobe.peak_bytes(specs[0], measure=lambda step: 0)
    assert specs[-1] is False


def test_step_hooks_run_outside_the_timed_region():
    clock = FakeClock()
    step = clock.step("S", [0.01])
    step.before = lambda: (clock.calls.append("before"), setattr(clock, "now", clock.now + 1.0))
    step.after = lambda: (clock.calls.append("after"), setattr(clock, "now", clock.now + 1.0))
    out = core.time_steps({"S": step}, CPU, repeats=3, budget_s=100.0, clock=clock)
    assert out["S"]["median_ms"] == pytest.approx(10.0)  # the hooks' 2 s per call are not timed
    assert clock.calls[:6] == ["before", "S", "after"] * 2
    calls = []
    measured = lambda: calls.append("step")  # noqa: E731
    measured.before, measured.after = (lambda: calls.append("before")), (lambda: calls.append("after"))
    core.measure_cpu_memory_here(measured)
    assert calls == ["before", "step", "after"]


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, stopped: bool) -> bool:
    import time

    for _ in range(200):
        if (_state(pid) == "T") == stopped:
            return True
        time.sleep(0.005)
    return False


def test_busy_core_steps_resume_a_started_spinner_outside_the_timed_call():
    """The load of the "beside a busy core" cases starts once per case, when it builds its steps; the
    steps' hooks resume and pause it around each call, and the timed call starts no process."""
    from fastalign.bench.cases import under_load

    ran = []
    steps = under_load._make(lambda: {"fastalign": (lambda x: ran.append(1) or x.sum(), (torch.zeros(1),))},
                             (), "fastalign")(CPU, "fwd+bwd")
    spinner = under_load._spinner
    try:
        pid = spinner.proc.pid
        assert _wait_state(pid, stopped=True)  # started, then paused until a busy-core step
        busy, alone = steps["busy core"], steps["alone"]
        busy.before()
        assert _wait_state(pid, stopped=False)
        busy()
        busy.after()
        assert _wait_state(pid, stopped=True)
        busy()  # called without its hooks, the step still runs beside the load
        assert _wait_state(pid, stopped=False)
        alone()
        assert _wait_state(pid, stopped=True)
        out = core.time_steps(steps, CPU, repeats=3, budget_s=0.2)
        assert all("median_ms" in r for r in out.values()) and len(ran) >= 8
        assert spinner.proc.pid == pid and _wait_state(pid, stopped=True)  # the same process, paused
    finally:
        spinner.stop()


def test_each_stage_of_a_case_is_announced():
    from fastalign.bench.__main__ import measure_case

    notes = []
    case = core.Case(op="x", label="tiny", params={}, build=lambda device, mode: {"a": lambda: None, "b": None},
                     impls=("a", "b"))
    rows = measure_case(case, "fwd", CPU, repeats=2, budget=0.05, memory=False, note=notes.append)
    assert [r["impl"] for r in rows] == ["a", "b"] and "median_ms" in rows[0] and "skipped" in rows[1]
    assert notes[0] == "building inputs" and "timing" in notes[1]


def test_summary_of_a_file_that_is_not_a_run(tmp_path, capsys):
    from fastalign.bench import summary

    other = tmp_path / "other.json"
    other.write_text('{"trainer": "grpo", "peak_rss": 1}')
    assert summary.main([str(other)]) == 1
    assert "not a fastalign-bench run" in capsys.readouterr().err


@pytest.mark.parametrize("content, readme", [(None, False), ("not json", False), ("[1, 2]", False), ("5", True)])
def test_summary_refuses_a_file_it_cannot_read(tmp_path, capsys, content, readme):
    """A missing file, one that is not JSON or one holding a JSON value other than an object is a usage error
    (exit status 2, one error line, no traceback), found before the README is rewritten."""
    from fastalign.bench import summary

    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    readme_path = tmp_path / "README.md"
    readme_path.write_text("# x\n")
    with pytest.raises(SystemExit) as e:
        summary.main((["--readme", str(readme_path)] if readme else []) + [str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("python -m fastalign.bench.summary: error: argument files: ")
    assert str(path) in err and readme_path.read_text() == "# x\n"


def test_cross_entropy_implementations_agree(monkeypatch):
    """The cross-entropy-on-logits cases time one loss: the Liger drop-in gives eager's ``F.cross_entropy`` (the
    softcap formed first, the z-loss from ``logsumexp``) at the warm-up shape, with a backward over logits that are
    an intermediate."""
    from fastalign.bench.cases import all_cases
    from fastalign.bench.core import call
    from fastalign.bench.optional import COMPILE

    monkeypatch.setitem(COMPILE, "enabled", False)
    cases = [c for c in all_cases() if c.op == "cross_entropy"]
    assert {c.label.split(" ", 2)[-1] for c in cases} == {"fp32", "bf16", "softcap 30", "smoothing 0.1 z-loss 0.0001"}
    for case in cases:
        steps = {impl: step for impl, step in case.warmup(torch.device("cpu"), "fwd+bwd").items() if step is not None}
        assert set(steps) == {"fastalign", "eager"}
        tol = 1e-2 if case.params["dtype"] == "bf16" else 1e-5  # a bf16 loss, as Liger's (and eager's) is
        torch.testing.assert_close(call(steps["fastalign"]).detach().float(), call(steps["eager"]).detach().float(),
                                   rtol=tol, atol=tol, msg=case.label)


def test_large_logit_linear_logprobs_implementations_agree():
    """The head case of logits far from 0 at T = 0.7 times one loss: fastalign's and eager's agree at its warm-up
    shape (rows of |lse| >= 32), with a backward; the case's |lse| is past 32 indeed."""
    from fastalign.bench.cases import all_cases
    from fastalign.bench.core import call

    case = next(c for c in all_cases() if c.op == "linear_logprobs" and "T=0.7" in c.label)
    steps = {impl: step for impl, step in case.warmup(torch.device("cpu"), "fwd+bwd").items() if step is not None}
    assert set(steps) == {"fastalign", "eager"}
    for got, want, name in zip(call(steps["fastalign"]), call(steps["eager"]), ("logprobs", "entropy")):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-4, msg=name)
    assert case.params["logit_offset"] / case.params["temperature"] > 32


def test_smoothed_cross_entropy_implementations_agree():
    """The label-smoothed softcapped cross-entropy case times one loss: its fastalign implementations (single pass,
    two passes, a separate mean) give eager's ``F.cross_entropy(label_smoothing=)`` at its warm-up shape, with a
    backward."""
    from fastalign.bench.cases import all_cases

    case = next(c for c in all_cases() if c.op == "smoothed_cross_entropy")
    steps = {impl: step for impl, step in case.warmup(torch.device("cpu"), "fwd+bwd").items() if step is not None}
    assert set(steps) == {"fastalign", "fastalign-two-pass", "separate-mean", "eager"}
    want = steps["eager"]().detach()
    for impl, step in steps.items():
        torch.testing.assert_close(step().detach(), want, rtol=1e-5, atol=1e-5, msg=impl)


def test_soft_cross_entropy_implementations_agree():
    """The soft-target distillation case times one loss: its fastalign implementations (single pass, two passes)
    give eager's masked ``F.kl_div`` of the full logits at its warm-up shape, with a backward."""
    from fastalign.bench.cases import all_cases

    case = next(c for c in all_cases() if c.op == "soft_cross_entropy")
    steps = {impl: step for impl, step in case.warmup(torch.device("cpu"), "fwd+bwd").items() if step is not None}
    assert set(steps) == {"fastalign", "fastalign-two-pass", "eager"}
    want = steps["eager"]().detach()
    for impl, step in steps.items():
        torch.testing.assert_close(step().detach(), want, rtol=1e-5, atol=1e-5, msg=impl)


def test_verl_distillation_implementations_agree():
    """The verl distillation case times one loss: fastalign's top-k forward KL gives verl's own (both of its paths)
    at the warm-up shape (the step with its backward; the gradients are compared in
    test_integration_verl_distillation.py)."""
    pytest.importorskip("verl.trainer.distillation.fsdp.losses", reason="verl is not importable")
    from fastalign.bench.cases import all_cases
    from fastalign.bench.core import call

    case = next(c for c in all_cases() if c.op == "verl_distillation")
    steps = case.warmup(torch.device("cpu"), "fwd+bwd")
    assert set(steps) == {"fastalign", "verl", "verl (chunked)"} and all(s is not None for s in steps.values())
    want = call(steps["verl"]).detach()
    for impl in ("fastalign", "verl (chunked)"):
        torch.testing.assert_close(call(steps[impl]).detach(), want, rtol=1e-5, atol=1e-5, msg=impl)


def test_verl_megatron_implementations_agree():
    """The verl Megatron case times one loss: fastalign's logits processor, and its work with the vocabulary merge
    forced, give verl's own (log-probs and entropy, with a backward) at the warm-up shape. The case starts a one-process group and Megatron's parallel state: both
    are torn down after, for the tests that start their own."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (make install: --no-deps)")
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from fastalign.bench.cases import all_cases
    from fastalign.bench.core import call

    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    case = next(c for c in all_cases() if c.op == "verl_megatron")
    try:
        steps = case.warmup(torch.device("cpu"), "fwd+bwd")
        assert set(steps) == {"fastalign", "fastalign (vocab_group)", "verl"}
        assert all(s is not None for s in steps.values())
        want = call(steps["verl"]).detach()
        for impl in ("fastalign", "fastalign (vocab_group)"):
            torch.testing.assert_close(call(steps[impl]).detach(), want, rtol=1e-5, atol=1e-5, msg=impl)
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()
