"""What this fastalign install carries and what runs on this machine.

``python -m fastalign.info`` prints it (``--json``: the dict as JSON); ``fastalign.info()`` returns it as a
dict (and prints it with ``fastalign.info(print_report=True)``):

* the fastalign, torch and triton versions;
* how the compiled core was built: compiler, CPU instruction sets, glibc target,
  OpenMP runtime, and the CUDA architectures of its CUDA kernels (if any). The
  CPU instruction sets are the baseline plus the kernel variants the binary
  really carries (``cpu_variants``: each one's features, and whether its probe
  ran correctly on this CPU), and ``cpu_variant_used`` names the one this CPU runs;
* the kernel family each public op runs on CPU tensors and, when a GPU is
  visible, on CUDA tensors (see docs/backends.md);
* whether the optional integrations (transformers, trl, verl, OpenRLHF, Liger-Kernel, PEFT, flash-attn) are
  importable — looked up with ``importlib.util.find_spec``, so nothing heavy is
  imported.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
from typing import NamedTuple


class EagerKernels(NamedTuple):
    """An op whose kernels of ``families`` run in plain eager calls, and its torch formula in every other call
    (torch.compile, functorch transforms): fastalign.ops._launch.eager_family_on picks, as the op picks."""
    families: tuple


# Public ops and the custom op whose kernels do their work (None: plain torch, on small tensors or, for the
# top-k support and the softcapped mean logit, on blocks of product logits; EagerKernels above). The
# family each runs here comes from the op table, fastalign._backend.OP_BACKENDS, as the op itself picks it.
OPS = (
    ("token_logprobs", "token_stats"),
    ("linear_logprobs", "linear_stats"),
    ("token_divergence", "divergence_rows"),
    ("linear_divergence_loss", "divergence_rows"),
    ("elementwise_divergence", "elementwise_divergence"),
    ("linear_topk_logprobs", None),
    ("linear_mean_logits", None),
    ("linear_soft_cross_entropy", None),
    ("policy_loss", "policy_loss_rows"),
    ("policy_loss (clip_cov/kl_cov selection)", "cov_select"),
    ("PolicyLoss", "policy_loss_rows"),
    ("LinearPolicyLoss", "linear_stats"),
    ("kl_penalty", EagerKernels(("cpp", "triton"))),
    ("aggregate_loss", None),
    ("group_advantages", "group_advantage"),
    ("token_advantages", None),
    ("masked_whiten", EagerKernels(("cpp", "triton"))),
    ("reinforce_pp_advantages", "reverse_scan"),
    ("remax_advantages", "reverse_scan"),
    ("gae_advantages", "reverse_scan"),
    ("implicit_process_advantages", "reverse_scan"),
    ("optimal_token_baseline_advantages", None),
    ("iw_opd_advantages", None),
    ("preference_loss", None),
    ("PreferenceLoss", None),
    ("unpaired_preference_loss", None),
    ("LinearPreferenceLoss", "linear_stats"),
    ("sequence_logprobs", None),
    ("wpo_weights", None),
)


def _setting() -> str:
    """The backend setting in force, or ``invalid: <why>`` (an unknown FASTALIGN_BACKEND value)."""
    from fastalign import _backend

    try:
        return _backend.current()
    except ValueError as e:
        return f"invalid: {e}"


def _families(device) -> dict:
    """The kernel family each public op runs for tensors on ``device`` under the backend setting in force."""
    from fastalign import _backend

    invalid = _setting().startswith("invalid")
    core_missing = "error" in _compiled_core()  # the C++ and CUDA kernels live in fastalign._C

    def family(op):
        if op is None:
            return "torch"
        if invalid:  # every op with kernels raises the setting's ValueError
            return "none (invalid backend setting)"
        if isinstance(op, EagerKernels):
            from fastalign.ops._launch import eager_family_on

            return eager_family_on(op.families, device) or "torch"
        try:
            # each public op first checks the request for its tensors' device (by _backend.resolve, or by
            # backend_for of its main kernel, which refuses the same requests), then runs its op's family
            _backend.resolve(device)
            name = _backend.backend_for(op, device)
            return "none (fastalign._C is missing)" if core_missing and name in ("cpp", "cuda") else name
        except ValueError as e:
            return f"none ({e})"

    return {name: family(op) for name, op in OPS}


INTEGRATIONS = (("transformers", "transformers"), ("trl", "trl"), ("verl", "verl"), ("openrlhf", "openrlhf"),
                ("liger-kernel", "liger_kernel"), ("peft", "peft"), ("flash-attn", "flash_attn"))


def _version(dist: str, module: str):
    """Installed version of ``dist`` if ``module`` is importable, else None (nothing is imported)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def _compiled_core() -> dict:
    try:
        from fastalign import _C
    except ImportError as e:
        from fastalign._backend import missing_core

        return {"error": missing_core(e)}
    info = dict(_C.build_info()) if hasattr(_C, "build_info") else {}
    info["file"] = _C.__file__
    info["cuda_kernels"] = bool(getattr(_C, "cuda_compiled", False))
    info["openmp_threads"] = _C.num_threads()
    if info["cuda_kernels"] and hasattr(_C, "cuda_runtime_status"):
        driver, runtime, devices, error = _C.cuda_runtime_status()
        info["cuda_runtime"] = {"driver": driver, "runtime": runtime, "devices": devices, "error": error}
    return info


def _gpu_backends() -> dict:
    """Kernel family per op on this machine's first GPU, or a reason there is none."""
    import torch

    if not torch.cuda.is_available():
        return {"device": None, "reason": "no CUDA device visible to torch"}
    from fastalign import _backend

    probe = getattr(_backend, "cuda_kernels_available", None)  # the compiled CUDA part is present at all
    present = probe() if callable(probe) else True
    usable = present and _backend.cuda_kernels_usable(torch.device("cuda", torch.cuda.current_device()))
    ops = _families(torch.device("cuda", torch.cuda.current_device()))
    return {"device": torch.cuda.get_device_name(), "capability": "sm_%d%d" % torch.cuda.get_device_capability(),
            "compiled_cuda_usable": usable, "ops": ops}


def info(print_report: bool = False) -> dict:
    """Versions, build facts, per-op backends and optional integrations, as a dict."""
    import torch

    import fastalign

    report = {
        "fastalign": fastalign.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton", "triton"),
        "compiled": _compiled_core(),
        "backend_setting": _setting(),
        "cpu_ops": _families(torch.device("cpu")),
        "cuda": _gpu_backends(),
        "integrations": {name: _version(name, module) for name, module in INTEGRATIONS},
    }
    if print_report:
        print(format_report(report))
    return report


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def format_report(r: dict) -> str:
    c = r["compiled"]
    lines = [
        f"fastalign {r['fastalign']}   torch {r['torch']}   triton {r['triton'] or 'not installed'}   "
        f"python {r['python']}",
        f"platform      {r['platform']}",
    ]
    if "error" in c:
        lines.append(f"compiled core MISSING: {c['error']}")
    else:
        lines += [
            f"compiled core {c['file']}",
            f"  compiler    {c.get('compiler', '?')}",
            f"  glibc       {'built for ' + c['glibc_target'] + ' (portable)' if c.get('glibc_target') else 'the build machine'}",
            f"  OpenMP      {c.get('openmp', '?')}, {c['openmp_threads']} threads",
            f"  CPU ISA     {'; '.join(c.get('cpu_isa', [])) or '?'}",
        ]
        if c.get("cpu_supports"):
            have = [k for k, v in c["cpu_supports"].items() if v]
            lines.append(f"  this CPU    {', '.join(have) or 'none of avx2/fma/avx512'}; "
                         f"runs the {c.get('cpu_variant_used', '?')} kernels")
        if c["cuda_kernels"]:
            rt = c.get("cuda_runtime", {})
            line = f"  CUDA        kernels for sm_{c.get('cuda_archs', '?').replace(',', ', sm_')}"
            if rt:
                line += (f"; CUDA runtime {_cuda_version(rt['runtime'])}, driver "
                         f"{_cuda_version(rt['driver']) if rt['driver'] else 'none'}, {rt['devices']} device(s)")
            lines.append(line)
        else:
            lines.append("  CUDA        no CUDA kernels in this build (GPU ops run their Triton or plain-torch paths)")
    lines.append(f"backend       {r['backend_setting']} (FASTALIGN_BACKEND / fastalign.use_backend)")
    gpu = r["cuda"]
    if gpu["device"] is None:
        lines.append(f"GPU           none: {gpu['reason']}")
    else:
        lines.append(f"GPU           {gpu['device']} ({gpu['capability']}), compiled CUDA kernels "
                     f"{'usable' if gpu['compiled_cuda_usable'] else 'not usable: Triton or plain-torch paths instead'}")
    width = max(len(n) for n in r["cpu_ops"])
    lines.append(f"{'op':<{width}}  CPU tensors  CUDA tensors")
    for name, cpu in r["cpu_ops"].items():
        on_gpu = gpu["ops"][name] if gpu["device"] is not None else "-"
        lines.append(f"{name:<{width}}  {cpu:<11}  {on_gpu}")
    lines.append("integrations  " + ", ".join(f"{k} {v or 'not installed'}" for k, v in r["integrations"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastalign.info", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON (the dict fastalign.info() returns)")
    args = p.parse_args(argv)
    report = info()
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    return 1 if "error" in report["compiled"] else 0  # a check step fails on a core that does not load


if __name__ == "__main__":
    sys.exit(main())
