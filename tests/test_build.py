"""The compiled core is independent of libtorch, and the package layout is what users import."""
import importlib.util
import os
import platform
import shutil
import struct
import sys
from pathlib import Path

import pytest

import fastalign

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import isa_check  # noqa: E402


def elf_needed(path):
    """DT_NEEDED entries of an ELF64 little-endian shared object (no binutils needed)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected an ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link -> .dynstr
    needed = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + val
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def test_extension_links_no_libtorch():
    needed = elf_needed(fastalign._backend.compiled().__file__)
    assert needed, "could not read NEEDED entries"
    assert not [n for n in needed if n.startswith(("libtorch", "libc10", "libcudart.so"))], needed


def test_cuda_sources_compiled_when_requested():
    if os.environ.get("FASTALIGN_CUDA") == "1":
        assert fastalign._backend.compiled().cuda_compiled


def test_cuda_bindings_check_arguments_before_any_launch():
    """The CUDA entry points are plain C functions (csrc/cuda/entry_points.h): their bindings check
    the arguments, and a launch the CUDA runtime refuses comes back as a RuntimeError that names
    the entry point, never as a silent return."""
    core = fastalign._backend.compiled()
    if not core.cuda_compiled:
        pytest.skip("this build of fastalign._C has no CUDA kernels")
    with pytest.raises(ValueError, match="unsupported dtype code"):
        core.token_stats_fwd_cuda(0, 7, 1, 4, 1, 4, 1, 0, 1.0, -100, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="group_size must be > 0"):
        core.group_stats_cuda(0, False, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="group_size must be > 0"):
        core.group_advantage_cuda(0, False, 4, 0, 0, -1, 0, 0, 0, 0, True, 1e-6, False, 0, 0, 0)
    gae = 2
    with pytest.raises(ValueError, match="gae needs values and out2"):
        core.reverse_scan_cuda(0, 0, 0, False, 1, 1, 1.0, 1.0, gae, 0, 0, 0)
    driver, runtime, devices, error = core.cuda_runtime_status()
    assert isinstance(error, str) and runtime >= 11000, (driver, runtime, devices, error)
    if not error:
        assert devices >= 1
        return
    assert devices == 0
    # No usable device here: a launch fails in the runtime, before any memory is touched.
    with pytest.raises(RuntimeError, match=r"^fastalign reverse_scan_cuda: .+"):
        core.reverse_scan_cuda(0, 0, 0, False, 1, 1, 1.0, 1.0, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"^fastalign token_stats_fwd_cuda: .+"):
        core.token_stats_fwd_cuda(0, 0, 1, 4, 1, 4, 1, 0, 1.0, -100, 0, 0, 0, 0, 0, 0)
    # Nothing to launch: no call into the runtime, no error.
    core.reverse_scan_cuda(0, 0, 0, False, 0, 5, 1.0, 1.0, 0, 0, 0, 0)


def test_triton_kernels_ship_inside_the_package():
    spec = importlib.util.find_spec("fastalign.kernels.token_stats")
    assert spec is not None and spec.origin.endswith("token_stats.py")


def _x86_64():
    return platform.machine() in ("x86_64", "AMD64")


def test_build_reports_the_kernel_variants_it_carries():
    """On x86-64 the core carries AVX-512 and AVX2 kernel variants (proven at build time by
    csrc/cpu/isa_probe.cpp); each variant the CPU supports runs its probe correctly, and the
    variant in use is the best one the CPU supports."""
    info = fastalign._backend.compiled().build_info()
    if not _x86_64():
        assert info["cpu_variants"] == [] and info["cpu_variant_used"] == "baseline"
        return
    variants = {v["name"]: v for v in info["cpu_variants"]}
    assert list(variants) == ["avx512", "avx2"], info["cpu_variants"]
    assert set(variants["avx512"]["features"].split(",")) >= {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"}
    assert set(variants["avx2"]["features"].split(",")) >= {"avx2", "fma"}
    cpu = info["cpu_supports"]
    has_avx2 = cpu["avx2"] and cpu["fma"]
    has_avx512 = has_avx2 and all(cpu[f] for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq"))
    assert variants["avx2"]["runs_here"] == has_avx2
    assert variants["avx512"]["runs_here"] == has_avx512
    assert info["cpu_variant_used"] == ("avx512" if has_avx512 else "avx2" if has_avx2 else "baseline")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_kernel_variants_contain_their_instruction_sets():
    """The machine code carries the AVX2 and AVX-512 kernels: thousands of zmm, ymm and FMA
    instructions (tools/isa_check.py), where a build that ignored the target attributes has none."""
    if not _x86_64():
        pytest.skip(f"{platform.machine()}: every variant is the baseline")
    counts = isa_check.vector_counts(fastalign._backend.compiled().__file__)
    assert isa_check.problems(counts) == [], counts


def test_isa_check_flags_a_baseline_only_binary():
    """The check itself fails on counts like those of a build compiled for the baseline only."""
    assert len(isa_check.problems({"instructions": 700000, "zmm": 0, "ymm": 0, "fma": 0})) == 3
    assert len(isa_check.problems({"instructions": 700000, "zmm": 12, "ymm": 9, "fma": 4})) == 3
    assert isa_check.problems({"instructions": 900000, "zmm": 40000, "ymm": 40000, "fma": 9000}) == []
