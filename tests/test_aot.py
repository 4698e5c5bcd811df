"""The ahead-of-time compile gate (``python -m fastalign.aot``) passes: every Triton kernel compiles
through its launcher at realistic shapes for sm_80, sm_90 and sm_100 (the default ``--arch``; one the installed
Triton cannot target is left out with a note) without bf16/fp16 register spills or
shared memory over the limit, and csrc/cuda/*.cu compile with nvcc (when present). Needs no GPU.
The table is printed into the test log."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _run(*args, timeout=1500):  # a guard against a hang: the whole gate takes 5-7 minutes on 2 cores
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastalign.aot", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_aot_gate_passes(capsys):
    proc = _run("--sass")
    with capsys.disabled():
        print("\n" + proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout
    for kernel in ("token_stats_fwd_kernel", "token_stats_bwd_kernel", "linear_stats_fwd_kernel",
                   "linear_stats_bwd_kernel", "linear_stats_finish_kernel", "policy_loss_fwd_kernel",
                   "divergence_rows_kernel"):
        assert kernel in proc.stdout, kernel
    # the fp32 linear products (TF32 and full fp32 "ieee") do not spill either: their tiles are sized for it
    fp32_spills = [line for line in proc.stdout.splitlines() if line.startswith(("linear_stats", "live_matmul"))
                   and "spills" in line]
    assert not fp32_spills, fp32_spills


def test_command_line_errors_say_why():
    """A malformed --arch is a usage error; an --only that matches no kernel family and no csrc/cuda file
    compiles nothing (nvcc included) and fails saying so."""
    proc = _run("--arch", "9x", "--no-nvcc", timeout=120)
    assert proc.returncode == 2 and "--arch" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("--only", "no_such_family", "--arch", "90", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--only 'no_such_family'" in proc.stdout and ".cu:" not in proc.stdout
    assert "TRITON_DEFAULT_FP_FUSION" not in proc.stderr
    proc = _run("--only", "reverse_scan", "--arch", "999", "--no-nvcc", timeout=300)  # --only matches; no arch can run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no kernel was compiled" in proc.stdout and "contains --only" not in proc.stdout
    proc = _run("--jobs", "0", "--no-nvcc", timeout=120)
    assert proc.returncode == 2 and "--jobs must be at least 1" in proc.stderr


def test_worker_processes_compile_the_same_table():
    """--jobs 2 (forked workers, each its own cubin directory) gives the serial run's table, row for row."""
    tables = []
    for jobs in ("1", "2"):
        proc = _run("--only", "reverse_scan", "--arch", "90", "--no-nvcc", "--sass", "--jobs", jobs, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        tables.append([line for line in proc.stdout.splitlines() if not line.startswith("AOT gate:")])
    assert tables[0] == tables[1] and sum("reverse_scan_kernel" in line for line in tables[0]) == 6


def test_aot_gate_reports_a_spill_as_failure():
    """The gate's checks can fail: a bf16 result with spills or too much shared memory is a failure."""
    from fastalign.aot import Result, check

    spilled = Result("k", "v", 90, "bf16", registers=255, spill_bytes=64, smem=1024)
    check(spilled)
    assert spilled.problems
    big = Result("k", "v", 80, "fp32", registers=64, spill_bytes=0, smem=200 * 1024)
    check(big)
    assert big.problems
    fine = Result("k", "v", 90, "fp32", registers=255, spill_bytes=64, smem=200 * 1024)
    check(fine)
    assert not fine.problems


def test_nvcc_output_parsing():
    from fastalign.aot import _NV_ENTRY, _NV_SMEM, _NV_SPILL, _NV_USED, _short

    text = ("ptxas info    : Compiling entry function '_Z3fooP13__nv_bfloat16' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z3foo\n"
            "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
            "ptxas info    : Used 40 registers, used 1 barriers, 192 bytes smem, 400 bytes cmem[0]\n")
    assert _NV_ENTRY.search(text).group(2) == "90"
    assert _NV_USED.search(text).group(1) == "40"
    assert _NV_SMEM.search(text).group(1) == "192"
    assert _NV_SPILL.search(text).groups() == ("16", "8", "8")
    assert _short("fastalign::(anonymous namespace)::token_stats_fwd_kernel<__nv_bfloat16>(const T1 *)") == (
        "token_stats_fwd_kernel", "bf16")
    assert _short("void fastalign::(anonymous namespace)::token_stats_bwd_kernel<__half, false>(const T1 *)") == (
        "token_stats_bwd_kernel", "fp16")


_SPECIALISATIONS = """
import json
from fastalign import aot
out = []
for family, cases, dtypes in aot.FAMILIES:
    for dname in dtypes:
        for variant, launch in cases(aot._torch_dtype(dname)):
            with aot.capturing(90) as calls:
                launch()
            for fn, signature, constexprs, attrs, options in calls:
                flags = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if fn.arg_names[k[0]].isupper()}
                out.append([dname, fn.__name__, flags])
print(json.dumps(out))
"""

#: (kernel, flags, dtypes): flag combinations the ops launch, each of which the gate must compile
_LAUNCHED = [
    *[("token_stats_fwd_kernel", dict(WANT_ENT=e, WANT_SP2=False, WANT_AMAX=a), ("bf16", "fp32"))
      for e, a in ((True, False), (False, True), (True, True))],  # entropy; argmax; both (separable_step's extras)
    ("token_stats_bwd_kernel", dict(HAS_G_LP=True, HAS_G_ENT=False, HAS_G_SP2=True), ("bf16", "fp32")),
    ("token_stats_bwd_kernel", dict(HAS_G_LP=True, HAS_G_ENT=True, HAS_G_SP2=False), ("bf16", "fp32")),
    ("token_stats_bwd_kernel", dict(HAS_G_LP=False, HAS_G_ENT=True, HAS_G_SP2=False), ("bf16", "fp32")),
    *[("linear_stats_fwd_kernel", dict(WANT_ENT=e, WANT_SP2=s, WANT_AMAX=a, HAS_BIAS=False, SOFTCAP=False,
                                       LOW_RANK=False), ("bf16", "fp32"))
      for e, s, a in ((True, False, False), (False, True, False), (False, False, True))],
    *[("linear_stats_finish_kernel", dict(WANT_ENT=e, WANT_SP2=s, WANT_AMAX=a), ("bf16", "fp32"))
      for e, s, a in ((True, False, False), (False, True, False), (False, False, True))],
    *[("linear_stats_fwd_kernel", dict(WANT_ENT=False, WANT_SP2=False, WANT_AMAX=False, HAS_BIAS=b, SOFTCAP=c,
                                       LOW_RANK=r, PRECISION="tf32"), ("bf16", "fp32"))
      for b, c, r in ((True, False, False), (False, False, True), (True, True, False))],
    ("linear_stats_fwd_kernel", dict(WANT_ENT=False, HAS_BIAS=False, LOW_RANK=False, PRECISION="ieee"), ("fp32",)),
    ("linear_stats_bwd_kernel", dict(HAS_G_LP=True, HAS_BIAS=False, PRECISION="ieee"), ("fp32",)),
    *[("linear_stats_bwd_kernel", dict(HAS_G_LP=lp, HAS_G_ENT=True, HAS_G_SP2=False, HAS_BIAS=False, SOFTCAP=False,
                                       LOW_RANK=False, SKIP=False, BIAS_GRAD=False), ("bf16", "fp32"))
      for lp in (True, False)],
    *[("divergence_rows_kernel", dict(MODE=mode, GRAD=True, HARD=False, HAS_MASK=True), ("bf16", "fp32"))
      for mode in (0, 1, 2)],
    # token_divergence: the forward keeping the row state, the backward's gradient sweep from it
    *[("divergence_rows_kernel", dict(MODE=mode, GRAD=False, STATE_OUT=True, STATE_IN=False), ("bf16", "fp32"))
      for mode in (2, 4)],
    *[("divergence_rows_kernel", dict(MODE=mode, GRAD=True, HARD_GRAD=True, STATE_IN=True), ("bf16", "fp32"))
      for mode in (2, 4)],
    ("live_matmul_kernel", dict(LIVE_DIM=1, ACCUMULATE=False), ("bf16", "fp32")),  # dW of the first chunk
    ("live_matmul_kernel", dict(LIVE_DIM=0, ACCUMULATE=True), ("bf16", "fp32")),  # logits += a @ L.T (LoRA)
    # masked_whiten: the sums passes launch with UNBIASED=False whatever the option, the scale pass with either
    *[("masked_whiten_kernel", dict(PASS=p, UNBIASED=u), ("bf16", "fp32", "fp64"))
      for p, u in ((0, False), (1, False), (2, True), (2, False))],
]


def test_gate_compiles_the_flag_combinations_the_ops_launch():
    """Each flag combination of a realistic launch (one statistic, a bias or an adapter alone, the gradient of
    the entropy, full fp32 products, distillation without labels, the first chunk's dW, the LoRA products)
    is among the specialisations the gate compiles (captured on sm_90, no compile)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _SPECIALISATIONS], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = json.loads(proc.stdout)
    missing = [(kernel, flags, dname) for kernel, flags, dtypes in _LAUNCHED for dname in dtypes
               if not any(d == dname and k == kernel and flags.items() <= got.items() for d, k, got in compiled)]
    assert not missing, missing
