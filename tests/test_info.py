"""`fastalign.info()` / `python -m fastalign.info`, and the CUDA-kernel fallback rule."""
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import fastalign
from fastalign import _backend
from fastalign.info import INTEGRATIONS, OPS, format_report


def test_info_reports_versions_build_and_backends():
    r = fastalign.info()
    assert r["fastalign"] == fastalign.__version__
    assert r["torch"] == torch.__version__
    c = r["compiled"]
    assert "error" not in c, c
    assert c["cuda_kernels"] == bool(_backend.compiled().cuda_compiled)
    assert c["openmp_threads"] >= 1
    assert c["cpu_isa"], "the compiled instruction sets are listed"
    if c["cuda_kernels"]:
        assert c["cuda_archs"], "a build with CUDA kernels names their architectures"
    # every public op (or op family) has a CPU backend that the dispatcher really picks
    assert set(r["cpu_ops"]) == {name for name, _ in OPS}
    assert _backend.resolve(torch.device("cpu"), "auto") == "cpp"
    assert set(r["integrations"]) == {name for name, _ in INTEGRATIONS}
    if not torch.cuda.is_available():
        assert r["cuda"]["device"] is None


def test_info_names_every_public_op():
    """The op table covers the public functions and modules, so a new op cannot go unlisted."""
    listed = " ".join(name for name, _ in OPS)
    result_types = ("TokenStats", "TokenDivergence", "SequenceLogprobs", "TopKSupport", "AdvantagesAndReturns",
                    "POLICY_LOSS_TYPES", "PREFERENCE_LOSS_TYPES")
    not_ops = ("use_backend", "wpo_weights", "PolicyConfig", "OptionError", "RenamedWarning", "SharedSeed")
    ops = [n for n in fastalign.__all__ if n not in result_types + not_ops]
    missing = [n for n in ops if n not in listed and n.replace("_advantages", "") not in listed]
    assert not missing, missing


def test_integrations_are_found_without_importing_them():
    code = ("import sys, fastalign; r = fastalign.info(); "
            "print(r['integrations']['trl'] is not None, [m for m in ('trl', 'transformers', 'verl') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    found = importlib.util.find_spec("trl") is not None  # installed by `make install`
    assert out.split("\n")[-2] == f"{found} []", out  # and nothing was imported


def test_importing_fastalign_imports_no_trainer():
    code = "import sys, fastalign; print(sorted(m for m in ('trl', 'transformers', 'verl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_drop_in_trainer_without_trl_names_what_to_install():
    """Without trl installed (hidden here), a drop-in trainer's import names TRL 1.16 and the pip line, rather than
    a bare ModuleNotFoundError from inside the drop-in's module; the TRL profiles import without it."""
    code = ("import sys; sys.modules['trl'] = None\n"
            "from fastalign.integrations.trl import grpo_policy_config\n"
            "try:\n    from fastalign.integrations.trl import GRPOTrainer\n"
            "except ModuleNotFoundError as e:\n    print(e.name, '|', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("trl | ") and "TRL 1.16" in out and "pip install 'trl==1.16.*'" in out, out


def test_module_entry_point_prints_the_report():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "fastalign.info"], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert f"fastalign {fastalign.__version__}" in out and f"torch {torch.__version__}" in out
    assert "CPU ISA" in out and "integrations" in out
    cpu_ops = fastalign.info()["cpu_ops"]
    for name, _ in OPS:
        assert any(line.startswith(name) and cpu_ops[name] in line for line in out.splitlines()), name


def test_format_report_of_a_missing_core():
    r = fastalign.info()
    r["compiled"] = {"error": "fastalign._C is missing"}
    assert "compiled core MISSING" in format_report(r)


def test_a_core_that_does_not_import_is_diagnosed(tmp_path, monkeypatch):
    """The error said "missing: pip install ." also for a core that is there but does not load, and for a source
    checkout imported in place of the installed package (a reinstall fixes neither)."""
    err = ImportError("file too short")
    package = tmp_path / "checkout" / "fastalign"
    package.mkdir(parents=True)
    with monkeypatch.context() as patch:
        patch.setattr(_backend, "_core_file", lambda: None)  # the import system finds no core
        assert "reinstall fastalign" in _backend.missing_core(err, package=str(package))
        (tmp_path / "checkout" / "CMakeLists.txt").write_text("")
        assert f"imported from the source tree {package}" in _backend.missing_core(err, package=str(package))
        assert "(file too short)" in _backend.missing_core(err, package=str(package))
    core = package / "_C.cpython-311-x86_64-linux-gnu.so"
    message = _backend.missing_core(err, str(core), str(package))
    assert "_C.cpython-311-x86_64-linux-gnu.so does not load (file too short)" in message, message
    # this install: the core's file wherever the import system finds it (an editable install keeps it outside the
    # package folder, which is the checkout); it was taken for a checkout without a core
    message = _backend.missing_core(ImportError("undefined symbol: foo"))
    core = importlib.import_module("fastalign._C").__file__
    assert f"{core} does not load (undefined symbol: foo)" in message, message


def test_info_command_fails_without_a_compiled_core(monkeypatch, capsys):
    """python -m fastalign.info is a node's check step: it exits 1 when the core does not load (it exited 0)."""
    info_module = importlib.import_module("fastalign.info")  # fastalign.info is the function
    assert info_module.main([]) == 0
    report = fastalign.info()
    report["compiled"] = {"error": "fastalign._C is missing"}
    monkeypatch.setattr(info_module, "info", lambda print_report=False: report)
    for argv in ([], ["--json"]):
        assert info_module.main(argv) == 1
        assert "fastalign._C is missing" in capsys.readouterr().out


@pytest.mark.parametrize("archs, capability, runs", [
    ("80,90", 80, True),
    ("80,90", 86, True),          # sm_80 machine code runs on sm_86
    ("80,90", 89, True),
    ("80,90", 90, True),
    ("80-real,90-real", 100, False),  # no PTX: nothing runs on a newer major version
    ("80-real,90-real,100", 120, True),  # PTX for compute_100 is compiled by the driver for sm_120
    ("80-real,90-real,100-real", 75, False),
    ("90a-real", 90, True),
    ("90a", 100, False),           # architecture-specific code (and its PTX) runs on sm_90 only
    ("100a-real,120-real", 103, False),
    ("100f-real", 103, True),      # family-specific code runs on the family from its minor version up
    ("100f", 120, False),
    ("native", 90, True),          # CMake's own keywords cover the device; int() raised on them
    ("all-major", 75, True),
    ("bogus,90-real", 90, True),
    ("", 90, False),
])
def test_arch_compatibility_rule(archs, capability, runs):
    assert _backend._arch_runs(archs, capability) is runs


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                    reason="needs nvcc and cmake to configure a CUDA build")
def test_a_cmake_keyword_is_recorded_as_the_architectures_it_builds(tmp_path):
    """FASTALIGN_CUDA_ARCHS=all-major (or native) was recorded as the keyword, which cuda_kernels_usable took as
    runnable on any device; the build records the architectures CMake resolves it to."""
    import pybind11

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTALIGN_CUDA="1", FASTALIGN_CUDA_ARCHS="all-major")
    subprocess.run(["cmake", "-S", root, "-B", str(tmp_path), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}"], env=env, check=True, capture_output=True, timeout=300)
    flags = "".join(p.read_text() for p in tmp_path.rglob("flags.make"))
    recorded = re.search(r'FASTALIGN_CUDA_ARCHS=\\"([^"\\]*)', flags).group(1)
    assert all(re.fullmatch(r"\d+[af]?(-real|-virtual)?", arch) for arch in recorded.split(",")), recorded
    assert not _backend._arch_runs(recorded, 1), recorded  # sm_10 exists in no CUDA toolkit's list


def test_missing_cuda_kernels_fall_back_to_triton_with_one_warning(monkeypatch):
    """A build without CUDA kernels (or a driver too old for them) never errors: the op takes
    its Triton path and one warning says why, once per device."""
    fake = type("FakeCore", (), {"cuda_compiled": False})
    monkeypatch.setitem(sys.modules, "fastalign._C", fake)
    monkeypatch.setattr(fastalign, "_C", fake, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_backend, "_cuda_usable", {})
    dev = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.cuda_kernels_usable(dev) is False
        assert _backend.resolve(dev, "cuda") == "triton"
    assert len(caught) == 1 and "no CUDA kernels" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)


def test_old_driver_falls_back_to_triton(monkeypatch):
    """A driver too old for the kernels' CUDA runtime: the Triton kernels run, with a warning, without asking torch
    for the device's capability (which raises where torch itself cannot reach the device)."""
    class OldDriver:
        cuda_compiled = True

        @staticmethod
        def cuda_runtime_status():
            return 12020, 13000, 0, "CUDA driver version is insufficient for CUDA runtime version"

        @staticmethod
        def build_info():
            return {"cuda_archs": "80-real,90-real,100"}

    monkeypatch.setitem(sys.modules, "fastalign._C", OldDriver)
    monkeypatch.setattr(fastalign, "_C", OldDriver, raising=False)
    def unreachable(i=None):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "get_device_capability", unreachable)
    monkeypatch.setattr(_backend, "_cuda_usable", {})
    with pytest.warns(RuntimeWarning, match="driver .*12.2.* cannot run kernels built with CUDA 13.0"):
        assert _backend.cuda_kernels_usable(torch.device("cuda", 3)) is False


def test_a_bad_backend_setting_is_reported_not_raised(monkeypatch):
    """The diagnostic report names an unknown FASTALIGN_BACKEND value rather than dying on it."""
    monkeypatch.setenv("FASTALIGN_BACKEND", "tritn")
    r = fastalign.info()
    assert r["backend_setting"].startswith("invalid") and "tritn" in r["backend_setting"]
    assert all(v == "torch" or "invalid backend setting" in v for v in r["cpu_ops"].values())
    assert any(line.startswith("backend") and "tritn" in line for line in format_report(r).splitlines())


def test_command_line_options(capsys):
    import json

    from fastalign.info import main

    assert main(["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fastalign"] == fastalign.__version__ and set(r["cpu_ops"]) == {name for name, _ in OPS}
    with pytest.raises(SystemExit) as e:
        main(["--no-such-option"])
    assert e.value.code == 2 and "--no-such-option" in capsys.readouterr().err


def test_info_reports_what_runs_under_a_forced_backend(monkeypatch):
    """Under FASTALIGN_BACKEND=triton on CPU tensors: without the interpreter, the ops info lists as "none"
    refuse to run; with it, the Clip-Cov / KL-Cov selection runs the family info names (plain torch, the same
    picks as the C++ kernels of ``auto``)."""
    from fastalign.ops import cov_fallback

    row = "policy_loss (clip_cov/kl_cov selection)"
    g = torch.Generator().manual_seed(0)
    x, m8 = torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.3).to(torch.uint8)
    monkeypatch.setenv("FASTALIGN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_ops = fastalign.info()["cpu_ops"]
    for name, call in ((row, lambda: fastalign.policy_loss(x, x, x, m8.float(), loss_type="clip_cov")),
                       ("group_advantages", lambda: fastalign.group_advantages(x[0], torch.arange(5) // 3))):
        assert cpu_ops[name].startswith("none") and "TRITON_INTERPRET" in cpu_ops[name], (name, cpu_ops[name])
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            call()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastalign.info()["cpu_ops"][row] == "torch"
    ran, real = [], cov_fallback.cov_select
    monkeypatch.setattr(cov_fallback, "cov_select", lambda *a: ran.append("torch") or real(*a))
    adv = torch.randn(3, generator=g)
    loss = fastalign.policy_loss(x, x - 0.1, adv, m8.float(), loss_type="kl_cov", cov_ratio=0.5)[0]
    assert ran == ["torch"]
    with fastalign.use_backend("auto"):
        again = fastalign.policy_loss(x, x - 0.1, adv, m8.float(), loss_type="kl_cov", cov_ratio=0.5)[0]
        assert torch.equal(again, loss) and ran == ["torch"]


def test_a_missing_core_is_reported_for_the_ops_it_runs():
    """Without fastalign._C the report still listed cpp for every op on CPU tensors, each of which raised."""
    code = ("import sys; sys.modules['fastalign._C'] = None\n"
            "import fastalign; ops = fastalign.info()['cpu_ops']\n"
            "assert ops['token_logprobs'] == 'none (fastalign._C is missing)', ops\n"
            "assert ops['kl_penalty'] == 'torch', ops\n")
    subprocess.run([sys.executable, "-c", code], check=True)
