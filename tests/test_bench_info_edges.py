"""Figures the benchmark runner, ``fastalign.info`` and the ahead-of-time compile gate derive from their inputs:
when the interleaved rounds stop, the measured device limits (bytes read plus written, 2*n^3 FLOPs, the fastest
run), ratios against each case's own baseline with the returned gradients left out, MiB and GB/s units, each
(case, mode)'s share of a total time budget and the reserve kept before a memory probe, the bytes / FLOPs the
cases declare, the gate's shared-memory and spill limits, its exit status, the dtypes it compiles per
architecture, the spills it reads from ptxas, the loops it finds in SASS, and the backend ``fastalign.info``
reports per op. Expected values are worked out here from the inputs (fake clocks, fake timings, fake compiler
output), never read back from the code under test."""
import argparse
import importlib
import types

import pytest
import torch

import fastalign
from fastalign import _backend, aot
from fastalign.bench import __main__ as cli
from fastalign.bench import core, optional, report

info_mod = importlib.import_module("fastalign.info")  # the module (fastalign.info is the function)
CPU = torch.device("cpu")


class FakeClock:
    """A clock that only moves when a step says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def step(self, seconds):
        def run():
            self.now += seconds
        return run


# ----------------------------------------------------------------------------- when rounds stop

def test_rounds_stop_once_repeats_are_done_and_a_second_has_passed():
    """With a generous budget the rounds end at the first round after ``repeats`` that ends past one second:
    two steps of 0.125 s make 0.25 s rounds, so 4 rounds reach exactly 1.0 s and the 5th ends past it."""
    clock = FakeClock()
    steps = {"A": clock.step(0.125), "B": clock.step(0.125)}
    out = core.time_steps(steps, CPU, repeats=2, budget_s=100.0, clock=clock)
    round_s, k = 0.25, 2
    while not k * round_s > 1.0:
        k += 1
    assert out["A"]["runs"] == out["B"]["runs"] == k == 5


def test_rounds_are_capped_at_a_thousand():
    """Steps so fast that a thousand rounds take well under a second stop at 1000 rounds."""
    clock = FakeClock()
    out = core.time_steps({"A": clock.step(1e-4), "B": clock.step(1e-4)}, CPU, repeats=2, budget_s=100.0,
                          clock=clock)
    assert out["A"]["runs"] == out["B"]["runs"] == 1000


# ----------------------------------------------------------------------------- measured device limits

def test_device_limits_count_read_and_write_and_take_the_fastest_run(monkeypatch):
    """copy GB/s = bytes read + bytes written (a 2**26-float copy on CPU) / the fastest copy; matmul TFLOP/s =
    2 * 2048**3 / the fastest matmul; the median run does not enter."""
    timings = iter([{"min_ms": 2.0, "median_ms": 3.0}, {"min_ms": 5.0, "median_ms": 8.0}])
    monkeypatch.setattr(core, "time_step", lambda step, device, repeats, budget_s: next(timings))
    limits = core.device_limits(CPU, ("fp32",), budget_s=0.1)
    n = 2 ** 26
    assert limits["copy_GBps"] == pytest.approx(2 * n * 4 / 2.0e-3 / 1e9)
    assert limits["matmul_TFLOPs"] == {"fp32": pytest.approx(2 * 2048 ** 3 / 5.0e-3 / 1e12)}


# ----------------------------------------------------------------------------- ratios and units

def _timed(impl, median, baseline, **extra):
    return {"op": "linear_logprobs", "case": "4x8", "mode": "fwd+bwd", "impl": impl, "median_ms": median,
            "iqr_ms": 0.0, "runs": 5, "baseline": baseline, **extra}


def test_ratios_are_taken_against_the_case_baseline_not_eager():
    """A case whose baseline is another implementation (here "liger") has its speed-up and memory ratio
    taken against that one, measured in the same run, even when an eager row is there too."""
    rows = [_timed("eager", 12.0, "liger", peak_extra_bytes=900), _timed("liger", 6.0, "liger", peak_extra_bytes=400),
            _timed("fastalign", 2.0, "liger", peak_extra_bytes=100)]
    report.add_ratios(rows, {})
    ours = rows[2]
    assert ours["speedup"] == pytest.approx(6.0 / 2.0)
    assert ours["memory_ratio"] == pytest.approx(100 / 400)
    assert rows[0]["speedup"] == pytest.approx(6.0 / 12.0)


def test_memory_ratio_leaves_out_the_gradients_every_implementation_returns():
    """memory ratio = (peak - required) / (baseline peak - required): 300 B and 500 B with 100 B of returned
    gradients give 200 / 400."""
    rows = [_timed("eager", 4.0, "eager", peak_extra_bytes=500, required_bytes=100),
            _timed("fastalign", 2.0, "eager", peak_extra_bytes=300, required_bytes=100)]
    report.add_ratios(rows, {})
    assert rows[1]["memory_ratio"] == pytest.approx((300 - 100) / (500 - 100))


def test_table_shows_peak_extra_memory_in_mib():
    """The "extra MiB" column is bytes / 2**20: 3 MiB shows 3.0 (3.1 were it megabytes)."""
    rows = [_timed("eager", 4.0, "eager", peak_extra_bytes=6 * 2 ** 20),
            _timed("fastalign", 2.0, "eager", peak_extra_bytes=3 * 2 ** 20)]
    data = {"environment": {"device": "CPU", "torch": "t", "date": "d"}, "device_limits": {}, "results": rows}
    report.add_ratios(rows, {})
    line = next(ln for ln in report.table(data).splitlines() if ln.split()[3:4] == ["fastalign"])
    # op case mode impl median IQR speedup MiB ratio %limit baseline
    assert line.split()[7] == f"{3 * 2 ** 20 / 2 ** 20:.1f}" == "3.0"
    assert line.split()[8] == "0.500"


# ----------------------------------------------------------------------------- one (case, mode)

def _case(label="B=2 T=4", **kw):
    def build(device, mode):
        return {"fastalign": lambda: None, "eager": lambda: None}
    return core.Case(op="policy_loss", label=label, params={"dtype": "fp32"}, build=build,
                     impls=("fastalign", "eager"), **kw)


def test_measure_case_rates_are_in_gb_and_tflop_per_second(monkeypatch):
    """GB/s = declared bytes / median time and TFLOP/s = declared FLOPs / median time, in SI units."""
    timing = {"median_ms": 4.0, "p25_ms": 4.0, "p75_ms": 4.0, "iqr_ms": 0.0, "min_ms": 4.0, "runs": 3}
    monkeypatch.setattr(core, "time_steps", lambda steps, *a, **k: {n: dict(timing) for n in steps})
    case = _case(bytes_moved=lambda mode: 8_000_000_000, flops=lambda mode: 6_000_000_000_000)
    rows = cli.measure_case(case, "fwd", CPU, 3, 1.0, memory=False)
    for r in rows:
        assert r["GBps"] == pytest.approx(8e9 / 4.0e-3 / 1e9)  # 2000 GB/s
        assert r["TFLOPs"] == pytest.approx(6e12 / 4.0e-3 / 1e12)  # 1500 TFLOP/s


def test_memory_probe_keeps_the_time_reserved_for_later_cases(monkeypatch):
    """A memory probe starts only when the time left, less what is reserved for the cases after this one,
    is at least MIN_PROBE_S (5 s); it is then given that much time at most."""
    timing = {"median_ms": 1.0, "p25_ms": 1.0, "p75_ms": 1.0, "iqr_ms": 0.0, "min_ms": 1.0, "runs": 3}
    monkeypatch.setattr(core, "time_steps", lambda steps, *a, **k: {n: dict(timing) for n in steps})
    probes = []
    monkeypatch.setattr(core, "measure_cpu_memory_subprocess",
                        lambda case, mode, impl, timeout: probes.append(timeout) or 1234)
    clock = FakeClock()
    rows = cli.measure_case(_case(), "fwd", CPU, 3, 1.0, deadline=core.Deadline(12.0, clock=clock), reserve_s=10.0)
    assert probes == [] and all(r["memory_skipped"] == cli.MEMORY_OUT_OF_TIME for r in rows)  # 12 - 10 < 5
    rows = cli.measure_case(_case(), "fwd", CPU, 3, 1.0, deadline=core.Deadline(30.0, clock=clock), reserve_s=10.0)
    assert probes == [pytest.approx(20.0)] * 2 and all(r["peak_extra_bytes"] == 1234 for r in rows)


def test_run_shares_the_total_budget_over_the_cases_still_to_run(monkeypatch):
    """Under --total-budget each (case, mode) gets half of what is left over the (case, mode)s still to run,
    and the memory probes keep 15 s per later (case, mode) in reserve."""
    cases = [_case(label=f"c{i}", modes=("fwd",)) for i in range(3)]
    monkeypatch.setattr(cli, "selected_cases", lambda args, device_type: cases)
    monkeypatch.setattr(core, "device_limits", lambda device, dtypes, budget_s=2.0: {"copy_GBps": 1.0,
                                                                                     "matmul_TFLOPs": {}})
    monkeypatch.setattr(cli, "progress", lambda total: None)
    monkeypatch.setitem(optional.COMPILE, "enabled", optional.COMPILE["enabled"])
    seen = []
    monkeypatch.setattr(cli, "measure_case", lambda case, mode, device, repeats, budget, memory, deadline,
                        reserve_s, note: seen.append((budget, reserve_s)) or [])
    args = argparse.Namespace(device="cpu", no_compile=True, repeats=1, budget=1000.0, modes=None, quick=False,
                              total_budget=300.0, no_memory=False, ops=None, cases=None)
    cli.run(args, env={"device": "CPU"})
    assert [b for b, _ in seen] == [pytest.approx(0.5 * 300 / n, rel=1e-2) for n in (3, 2, 1)]
    assert [r for _, r in seen] == [15.0 * 2, 15.0 * 1, 0.0]


# ----------------------------------------------------------------------------- the cases' work model

def _elem(dtype):
    return {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


def test_declared_work_of_the_logprob_cases():
    """token_logprobs: the forward reads the N x V logits once (N*V*element bytes), forward+backward reads them
    twice and writes d(logits). linear_logprobs (full head): 2*N*H*V useful FLOPs forward, 3x that with the
    backward (dW and dH), and (N + V)*H*element bytes of hidden and weight read forward."""
    from fastalign.bench.cases import all_cases

    token = [c for c in all_cases() if c.op == "token_logprobs" and "tokens" in c.params]  # not the busy-core pair
    linear = [c for c in all_cases() if c.op == "linear_logprobs" and "lora_rank" not in c.params]
    assert token and linear
    for c in token:
        n = c.params["tokens"] * c.params["vocab"] * _elem(c.params["dtype"])
        assert (c.bytes_moved("fwd"), c.bytes_moved("fwd+bwd")) == (n, 3 * n), c.label
    for c in linear:
        N, H, V = c.params["tokens"], c.params["hidden"], c.params["vocab"]
        assert (c.flops("fwd"), c.flops("fwd+bwd")) == (2 * N * H * V, 6 * N * H * V), c.label
        assert c.bytes_moved("fwd") == (N + V) * H * _elem(c.params["dtype"]), c.label


# ----------------------------------------------------------------------------- the AOT gate's checks

def test_gate_shared_memory_limit_is_inclusive_and_fp16_spills_fail():
    """A block using exactly the opt-in shared memory of its architecture (227 KiB on sm_90 / sm_100, 163 KiB
    on sm_80) fits; one byte more fails. Register spills fail fp16 kernels as they fail bf16 ones."""
    for arch, kib in ((80, 163), (90, 227), (100, 227)):
        at = aot.Result("k", "v", arch, "bf16", registers=64, smem=kib * 1024)
        aot.check(at)
        assert at.problems == [], (arch, at.problems)
        over = aot.Result("k", "v", arch, "bf16", registers=64, smem=kib * 1024 + 1)
        aot.check(over)
        assert over.problems, arch
    half = aot.Result("k", "v", 90, "fp16", registers=255, spill_bytes=8, smem=0)
    aot.check(half)
    assert half.problems


def test_gate_exit_status_follows_the_checks(monkeypatch, capsys):
    """``python -m fastalign.aot`` exits 1 when a compiled kernel fails a check (a bf16 spill) and 0 when
    all pass."""
    monkeypatch.setattr(aot.cli, "supported_archs", lambda requested: list(requested))
    for spill, status in ((32, 1), (0, 0)):
        monkeypatch.setattr(aot.cli, "run_triton", lambda archs, sass, only=None, jobs=None, spill=spill: [
            aot.Result("k", "plain", 90, "bf16", registers=64, spill_bytes=spill, smem=1024)])
        assert aot.main(["--arch", "90", "--no-nvcc"]) == status
        out = capsys.readouterr().out
        assert f"{status} failing" in out


def test_gate_names_only_the_architectures_it_compiled(monkeypatch, capsys):
    """An architecture the installed nvcc does not target is left out with a note, and the summary names only what
    was compiled (it claimed every requested one, and an nvcc that targeted none of them compiled them all); one
    with no known shared-memory limit says that it was not checked."""
    monkeypatch.setattr(aot.cli, "nvcc_archs", lambda requested: [a for a in requested if a == 90])
    monkeypatch.setattr(aot.cli, "run_nvcc", lambda archs, root, sass, only=None: (
        [aot.Result("returns.cu", "plain", a, "fp32", registers=40, smem=0) for a in archs], None))
    assert aot.main(["--arch", "90,999", "--no-triton"]) == 0
    out = capsys.readouterr().out
    assert "compilations for sm_90 in" in out and "sm_999: not a target of the installed nvcc" in out
    assert "sm_999: no per-block shared memory limit known here" in out
    assert aot.main(["--arch", "999", "--no-triton"]) == 1
    assert "no kernel was compiled" in capsys.readouterr().out


def test_gate_compiles_each_family_for_its_dtypes_per_architecture(monkeypatch):
    """fp16 is left out from sm_100 on (its bf16 code path is the one compiled there; sm_80 / sm_90 compile
    fp16); ``--only`` keeps the families whose name contains it."""
    import triton

    monkeypatch.setattr(triton, "knobs", types.SimpleNamespace(cache=types.SimpleNamespace(dir=None),
                                                               compilation=types.SimpleNamespace(always_compile=False)))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    asked = []

    def family(name):
        def cases(dtype):
            asked.append((name, dtype))
            return iter(())
        return cases

    monkeypatch.setattr(aot.triton_gate, "FAMILIES", [
        ("token_stats", family("token_stats"), ("bf16", "fp16", "fp32")),
        ("reverse_scan", family("reverse_scan"), ("fp32",))])
    assert aot.run_triton([90, 100], sass=False) == []
    bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert asked == [("token_stats", bf), ("token_stats", fp16), ("token_stats", fp32), ("reverse_scan", fp32),
                     ("token_stats", bf), ("token_stats", fp32), ("reverse_scan", fp32)]
    asked.clear()
    aot.run_triton([80], sass=False, only="stats")
    assert asked == [("token_stats", bf), ("token_stats", fp16), ("token_stats", fp32)]


def test_nvcc_spills_are_stores_plus_loads_not_the_stack_frame(monkeypatch, tmp_path):
    """Per kernel, ``ptxas -v``'s spill stores plus spill loads are the spilled bytes (the stack frame is not a
    spill), with its registers and shared memory; an fp16 kernel that spills fails the gate."""
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "stats.cu").write_text("")
    log = ("ptxas info    : Compiling entry function '_Z1kI6__halfLb1EEvPKT_' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1kI6__halfLb1EEvPKT_\n"
           "    48 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 96 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n")

    class Proc:
        returncode = 0

        def __init__(self, cmd, **kw):
            self.cmd = cmd

        def communicate(self):
            return log, None

    monkeypatch.setattr(aot.nvcc_gate.shutil, "which", lambda name: "/opt/nvcc/bin/nvcc" if name == "nvcc" else None)
    monkeypatch.setattr(aot.nvcc_gate.subprocess, "Popen", Proc)
    monkeypatch.setattr(aot.nvcc_gate, "_demangle",
                        lambda names: ["void fastalign::k<__half, true>(const T1 *)"] * len(names))
    results, note = aot.run_nvcc([90], tmp_path, sass=False)
    assert note == "" and len(results) == 1
    r = results[0]
    assert (r.kernel, r.variant, r.dtype, r.arch) == ("stats.cu:k", "nvcc full", "fp16", 90)
    assert (r.registers, r.spill_bytes, r.smem) == (96, 12 + 20, 4096)
    aot.check(r)
    assert r.problems


def test_sass_loop_is_the_range_of_a_backward_branch():
    """The loop the gate reports spans a backward branch's target to the branch: instructions, barriers and
    global-load bytes per trip are counted inside it; a forward branch makes no loop and NOPs do not count."""
    lines = ["MOV R1, c[0x0][0x28]", "LDG.E.128 R4, [R2.64]", "BAR.SYNC.DEFER_BLOCKING 0x0", "FADD R4, R4, R5",
             "NOP", "@P0 BRA 0x10", "@P1 BRA 0x80", "STG.E [R2.64], R4", "EXIT", "BRA 0x90"]
    dump = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(lines))
    st = aot._stats_of(dump)
    assert st.total == len(lines) - 1  # the NOP
    # 0x10 .. 0x50: LDG, BAR, FADD, (NOP), BRA
    assert (st.loop, st.loop_barriers, st.loop_load_bytes) == (4, 1, 16)
    assert st.barriers == 1


# ----------------------------------------------------------------------------- fastalign.info

def test_report_shows_each_op_s_gpu_backend_in_its_own_column():
    """The CUDA-tensors column shows the backend each op runs on the GPU, not the CPU one, and says whether the
    compiled CUDA kernels are usable."""
    r = fastalign.info()
    names = list(r["cpu_ops"])
    r["cpu_ops"] = {n: "cpp" for n in names}
    gpu_ops = {n: ("cuda" if i % 2 else "triton") for i, n in enumerate(names)}
    r["cuda"] = {"device": "Test GPU", "capability": "sm_90", "compiled_cuda_usable": False, "ops": gpu_ops}
    lines = info_mod.format_report(r).splitlines()
    width = max(len(n) for n in names)
    for n in names:
        assert f"{n:<{width}}  {'cpp':<11}  {gpu_ops[n]}" in lines, n
    gpu_line = next(ln for ln in lines if ln.startswith("GPU"))
    assert "not usable" in gpu_line and "Test GPU (sm_90)" in gpu_line


def test_a_missing_core_is_reported_for_the_ops_it_runs_on_cuda_tensors(monkeypatch):
    """Without fastalign._C an op whose CUDA-tensor family is the compiled CUDA kernels cannot run: info names
    it as missing, while a Triton family still runs."""
    monkeypatch.setattr(info_mod, "_compiled_core", lambda: {"error": "fastalign._C is missing"})
    monkeypatch.setattr(info_mod, "_setting", lambda: "auto")
    monkeypatch.setattr(_backend, "resolve", lambda device, backend=None: "auto")
    monkeypatch.setattr(_backend, "backend_for", lambda op, device, backend=None:
                        "cuda" if op == "reverse_scan" else "triton")
    ops = info_mod._families(torch.device("cuda"))
    assert ops["gae_advantages"] == "none (fastalign._C is missing)"
    assert ops["token_logprobs"] == "triton" and ops["kl_penalty"] == "triton"  # its eager CUDA calls
    assert ops["masked_whiten"] == "triton" and ops["aggregate_loss"] == "torch"
