"""Ahead-of-time compile gate for the GPU kernels; needs no GPU.

    python -m fastalign.aot [--arch 80,90,100] [--no-nvcc] [--sass] [--only NAME]

Every Triton kernel is compiled through its real launcher: the launchers run on
``meta`` tensors at realistic shapes (N = 8192 tokens, V = 151936, H = 4096 in
bf16, fp16 and fp32) while Triton's own argument binder specialises the call
exactly as a launch would; instead of launching, the specialisation (signature,
constexprs, alignment attributes, num_warps, num_stages) is recorded and then
compiled with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``, which
runs the ptxas that ships with Triton. Each compiled kernel is checked:

* it compiles (an error fails the gate);
* no register spills in bf16/fp16 variants (fp32 spills are reported);
* its shared memory fits the per-block limit of the architecture.

Then each ``csrc/cuda/*.cu`` is compiled by nvcc with ``-Xptxas -v`` for the
same architectures and checked the same way (skipped, with a message, when nvcc
is absent). A table (kernel, variant, arch, registers, spills, shared memory,
SASS instructions, barriers) is printed, one row per distinct specialisation (several cases may launch
the same one: it is listed under the first). Nothing is cached across runs: Triton's
cache goes to a fresh temporary directory and every kernel is compiled again.
Exit status 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Largest shared memory one block may use (opt-in), bytes.
SMEM_LIMIT = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
              90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024}
N_TOKENS, VOCAB, HIDDEN = 8192, 151936, 4096
LORA_RANK = 16  # a LoRA adapter on the lm_head
SEQ_B, SEQ_T = 1024, 4096


@dataclass
class Result:
    kernel: str
    variant: str
    arch: int
    dtype: str = ""
    registers: int = -1
    spill_bytes: int = 0
    smem: int = 0
    sass: "Sass" = None
    error: str = ""
    problems: list = field(default_factory=list)


# ----------------------------------------------------------------------------- capture

class _FakeCudaDriver:
    """Enough of Triton's active driver for the binder to specialise a call for ``arch``."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_device(self):
        return self.arch  # one binder cache per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):
        raise RuntimeError(f"the AOT gate does not launch kernels (driver.{name} was requested)")


@contextlib.contextmanager
def capturing(arch: int):
    """Inside: a kernel launch records ``(jit_fn, signature, constexprs, attrs, options)`` and returns."""
    import triton.runtime.jit as jit
    from triton.runtime.driver import driver

    calls = []
    original = jit.JITFunction._do_compile

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        calls.append((self, dict(signature), dict(constexprs), attrs, options))
        return None

    previous = driver._active  # None without a GPU: the real driver is only created on demand
    driver.set_active(_FakeCudaDriver(arch))
    jit.JITFunction._do_compile = record
    try:
        yield calls
    finally:
        jit.JITFunction._do_compile = original
        driver.set_active(previous)


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------- launch cases

def _variant(**flags) -> str:
    on = [k for k, v in flags.items() if v]
    return "+".join(on) if on else "plain"


def token_stats_cases(dtype):
    """The statistics the ops request: a forward with (entropy, sum_p2, argmax), a backward with the
    gradients (g_lp, g_ent, g_sp2) of those outputs that take part in the loss."""
    import torch

    from fastalign.kernels import token_stats as K

    z = _meta(1, N_TOKENS, VOCAB, dtype=dtype)
    y = _meta(N_TOKENS, dtype=torch.int64)
    f = lambda on=True: _meta(N_TOKENS, dtype=torch.float32) if on else None  # noqa: E731
    for ent, sp2, amax in ((False, False, False), (True, False, False), (True, True, True)):
        yield _variant(entropy=ent, sum_p2=sp2, argmax=amax), lambda ent=ent, sp2=sp2, amax=amax: \
            K.token_stats_forward(z, y, 1.0, -100, f(), f(ent), f(sp2),
                                  _meta(N_TOKENS, dtype=torch.int64) if amax else None, f(), f())
    for g_lp, g_ent, g_sp2 in ((True, False, False), (True, True, False), (False, True, False), (True, True, True)):
        yield _variant(g_lp=g_lp, g_ent=g_ent, g_sp2=g_sp2), lambda g_lp=g_lp, g_ent=g_ent, g_sp2=g_sp2: \
            K.token_stats_backward(z, y, 1.0, -100, f(), f(g_ent), f(g_sp2), f(g_lp), f(g_ent), f(g_sp2),
                                   torch.empty_like(z), f())


@contextlib.contextmanager
def _fp32_matmul(choice: str):
    """The launchers' fp32 product precision option, ``FASTALIGN_FP32_MATMUL``, set to ``choice`` during a launch."""
    previous = os.environ.get("FASTALIGN_FP32_MATMUL")
    os.environ["FASTALIGN_FP32_MATMUL"] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FASTALIGN_FP32_MATMUL"]
        else:
            os.environ["FASTALIGN_FP32_MATMUL"] = previous


def linear_stats_cases(dtype):
    """The flag combinations the ops launch: a forward per requested statistic and head extra (bias, softcap,
    a LoRA adapter) and backward chunks per set of output gradients; fp32 heads with TF32 and with full fp32
    (``ieee``) products."""
    import torch

    from fastalign.kernels import linear_stats as K
    from fastalign.ops._launch import linear_outputs
    from fastalign.ops.linear_triton import gpu_chunk_tokens
    from fastalign.ops.vocab_pieces import RENORMALISE_ABOVE

    h = _meta(N_TOKENS, HIDDEN, dtype=dtype)
    w = _meta(VOCAB, HIDDEN, dtype=dtype)
    y = _meta(N_TOKENS, dtype=torch.int64)
    b = _meta(VOCAB, dtype=dtype)
    lora = (_meta(N_TOKENS, LORA_RANK, dtype=dtype), _meta(VOCAB, LORA_RANK, dtype=dtype))
    chunk = gpu_chunk_tokens(N_TOKENS, VOCAB, h.element_size())
    f = lambda on=True, n=N_TOKENS: _meta(n, dtype=torch.float32) if on else None  # noqa: E731
    head = dict(bias=True, softcap=True, low_rank=True)

    def forward(entropy=False, sum_p2=False, argmax=False, mean_logit=False, bias=False, softcap=False, low_rank=False,
                ieee=False):
        out = linear_outputs(N_TOKENS, "meta", entropy, sum_p2, argmax, mean_logit)
        with _fp32_matmul("ieee" if ieee else "tf32"):
            K.linear_stats_forward(h, w, b if bias else None, lora if low_rank else None, y, 1.0,
                                   30.0 if softcap else 0.0, 1.0, -100, out, RENORMALISE_ABOVE)

    def backward(g_lp=False, g_ent=False, g_sp2=False, g_mean=False, bias=False, softcap=False, low_rank=False,
                 skip=False, bias_grad=False, ieee=False):
        c = lambda on=True: f(on, chunk)  # noqa: E731
        with _fp32_matmul("ieee" if ieee else "tf32"):
            K.linear_stats_backward(
                h[:chunk], w, b if bias else None, (lora[0][:chunk], lora[1]) if low_rank else None, y[:chunk], c(),
                c(g_ent), c(g_sp2), c(g_lp), c(g_ent), c(g_sp2), 1.0, 30.0 if softcap else 0.0, 1.0, -100,
                1e-6 if skip else 0.0, _meta(chunk, VOCAB, dtype=dtype), c(),
                _meta(VOCAB, dtype=torch.float32) if bias_grad else None, c(g_mean))

    forwards = [{}, dict(entropy=True), dict(sum_p2=True), dict(argmax=True), dict(mean_logit=True, softcap=True),
                dict(bias=True), dict(bias=True, softcap=True), dict(low_rank=True),
                dict(entropy=True, sum_p2=True, argmax=True, mean_logit=True, **head)]
    backwards = [dict(g_lp=True), dict(g_lp=True, g_ent=True), dict(g_ent=True),
                 dict(g_lp=True, g_mean=True, softcap=True),
                 dict(g_lp=True, g_ent=True, g_sp2=True, g_mean=True, skip=True, bias_grad=True, **head)]
    if dtype == torch.float32:
        forwards.append(dict(ieee=True))
        backwards.append(dict(g_lp=True, ieee=True))
    for flags in forwards:
        yield _variant(**flags), lambda flags=flags: forward(**flags)
    for flags in backwards:
        yield _variant(**flags), lambda flags=flags: backward(**flags)


def policy_loss_cases(dtype):
    """Every loss row, then one case with every optional input: launch keywords come from
    :class:`fastalign.PolicyConfig`, as the op builds them."""
    import torch

    from fastalign.kernels import policy_loss as K
    from fastalign.ops.policy_loss import ROW_COLS
    from fastalign.policy_config import PolicyConfig

    B, T = SEQ_B, SEQ_T
    t = lambda: _meta(B, T, dtype=torch.float32)  # noqa: E731
    u8 = lambda: _meta(B, T, dtype=torch.uint8)  # noqa: E731
    row = lambda: _meta(B, len(ROW_COLS), dtype=torch.float32)  # noqa: E731

    def launch(cfg, full):
        kw = cfg.kernel_params(entropy_in_kernel=full)._asdict()
        opt = (t(), t(), t(), t(), t(), u8()) if full else (None,) * 6  # ref, ent, roll, keep, iw, sel
        return lambda: K.policy_loss_forward(t(), t(), t(), u8(), *opt, row(), t(), **kw)

    row_options = {"dppo_tv": dict(delta=20.0), "dppo_kl": dict(delta=20.0), "dro": dict(dro_beta=0.1)}
    for loss_type in ("ppo", "gspo", "cispo", "sapo", "reinforce", "gmpo", "clip_cov", "kl_cov", "vespo", "dppo_tv",
                      "dppo_kl", "dro"):
        yield loss_type, launch(PolicyConfig(loss_type=loss_type, **row_options.get(loss_type, {})), False)
    full = PolicyConfig(loss_type="ppo", eps_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_type="k3", kl_rho="grad",
                        entropy_coef=0.01, rollout_correction="sequence_truncate", offpolicy_threshold=0.5,
                        importance_sampling_level="sequence")
    yield "ppo+kl3+ent+roll+seq", launch(full, True)


def scan_cases(dtype):
    """The reverse scan of returns and GAE (the ops with a CUDA C++ kernel too)."""
    from fastalign.kernels import reverse_scan as K

    yield from K.aot_cases(dtype)


def divergence_cases(dtype):
    """The distillation divergence rows: a GPU block of student and teacher logits in the input dtype, each
    divergence (forward KL, reverse KL, generalized JSD, cosine, TVD; the kernel's mode as the op picks it),
    without gradients, and with them: without labels, with labels, and with the hard loss; token_divergence's
    forward (the row state kept) and its backward (the gradient sweep from the state)."""
    import torch

    from fastalign.kernels import divergence as K
    from fastalign.ops.divergence import divergence_mode

    rows = 2048
    zs, zt = _meta(rows, VOCAB, dtype=dtype), _meta(rows, VOCAB, dtype=dtype)
    f = lambda: _meta(rows, dtype=torch.float32)  # noqa: E731
    y = _meta(rows, dtype=torch.int64)
    for divergence, beta, kind in (("jsd", 0.0, "fkl"), ("jsd", 1.0, "rkl"), ("jsd", 0.5, "jsd"),
                                   ("cosine", 0.5, "cosine"), ("tvd", 0.5, "tvd")):
        mode = divergence_mode(divergence, beta)
        yield kind, lambda mode=mode, beta=beta: K.divergence_rows(zs, zt, 1.0, mode, beta, None, None, -100, None,
                                                                   None, f(), f(), None)
        # token_divergence: its forward keeps each row's state (without labels, or with them and their mask); its
        # backward is the gradient sweep from that state (without labels or a mask, with the mask, with the hard loss)
        state = _meta(rows, K.STATE_COLS.value, dtype=torch.float32)
        for labels in (False, True):
            yield kind + "+state" + ("+labels+mask" if labels else ""), lambda mode=mode, beta=beta, labels=labels: \
                K.divergence_rows(zs, zt, 1.0, mode, beta, f() if labels else None, y if labels else None, -100, None,
                                  None, f(), f(), f() if labels else None, state)
        for mask, hard in ((False, False), (True, False), (True, True)):
            name = kind + "+grad+state" + ("+hard" if hard else "") + ("+mask" if mask else "")
            yield name, lambda mode=mode, beta=beta, mask=mask, hard=hard: K.divergence_rows(
                zs, zt, 1.0, mode, beta, f() if mask else None, y if hard else None, -100, f(), f() if hard else None,
                f(), f(), None, state, True)
        # no labels (plain distillation), labels as the nll metric only, or the weighted hard loss too
        for labels, hard in ((False, False), (True, False), (True, True)):
            name = kind + "+grad" + ("+hard" if hard else "+labels" if labels else "") + "+mask"
            yield name, lambda mode=mode, beta=beta, labels=labels, hard=hard: K.divergence_rows(
                zs, zt, 1.0, mode, beta, f(), y if labels else None, -100, f(), f() if hard else None, f(), f(),
                f() if labels else None)


def elementwise_divergence_cases(dtype):
    """The divergences between given (log-)probabilities: every mode, forward and gradient."""
    from fastalign.kernels import elementwise_divergence as K

    yield from K.aot_cases(dtype)


def live_matmul_cases(dtype):
    """The LM-head products bounded by the count of labelled rows (device compaction)."""
    from fastalign.kernels import live_matmul as K

    yield from K.aot_cases(dtype)


#: (family, case generator, dtypes it runs for)
FAMILIES = [
    ("token_stats", token_stats_cases, ("bf16", "fp16", "fp32")),
    ("linear_stats", linear_stats_cases, ("bf16", "fp16", "fp32")),
    ("live_matmul", live_matmul_cases, ("bf16", "fp16", "fp32")),
    ("divergence", divergence_cases, ("bf16", "fp16", "fp32")),
    ("elementwise_divergence", elementwise_divergence_cases, ("bf16", "fp16", "fp32")),
    ("policy_loss", policy_loss_cases, ("fp32",)),
    ("reverse_scan", scan_cases, ("fp32", "fp64")),
]


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[name]


# ----------------------------------------------------------------------------- compile + inspect

_REG = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _cuobjdump() -> str | None:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.exists() else shutil.which("cuobjdump")


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LDG_BYTES = {"": 4, ".64": 8, ".128": 16, ".U16": 2, ".S16": 2, ".U8": 1}


@dataclass
class Sass:
    total: int = -1      # instructions in the kernel (NOPs excluded)
    barriers: int = -1   # block barriers (BAR.SYNC) in the kernel
    loop: int = -1       # instructions in the largest innermost loop
    loop_barriers: int = -1
    loop_load_bytes: int = 0  # bytes one thread loads from global memory per loop trip
    mma: str = "-"       # tensor-core instruction used (HGMMA: Hopper warpgroup MMA; HMMA: mma.sync)


def _dump_sass(cubin: bytes, tmp: Path, tool: str) -> str:
    path = tmp / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run([tool, "--dump-sass", str(path)], capture_output=True, text=True).stdout


def sass_stats(cubin: bytes, tmp: Path, tool: str | None) -> Sass:
    """Instruction counts from the SASS of a one-kernel cubin (cuobjdump)."""
    if tool is None:
        return Sass()
    return _stats_of(_dump_sass(cubin, tmp, tool))


def sass_stats_per_function(cubin: bytes, tmp: Path, tool: str) -> dict:
    """{mangled kernel name: Sass} for a cubin holding several kernels."""
    out = {}
    for part in re.split(r"(?=\n\s+Function : )", _dump_sass(cubin, tmp, tool)):
        m = re.search(r"Function : (\S+)", part)
        if m:
            out[m.group(1)] = _stats_of(part)
    return out


def _stats_of(out: str) -> Sass:
    """A loop is the range of a backward branch; the reported loop is the largest innermost one."""
    instr = []
    for ln in out.splitlines():
        m = _SASS_LINE.match(ln)
        if m and not m.group(2).strip().startswith("NOP"):
            instr.append((int(m.group(1), 16), m.group(2).strip()))
    is_bar = lambda op: re.search(r"\bBAR\.SYNC|\bBAR\s", op + " ") is not None and "ARV" not in op  # noqa: E731
    loops = []
    for addr, op in instr:
        br = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x)([0-9a-f]+)?", op)
        if br and br.group(1) and int(br.group(1), 16) < addr:
            loops.append((int(br.group(1), 16), addr))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a < b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    st = Sass(total=len(instr), barriers=sum(1 for _, op in instr if is_bar(op)))
    def mnemonic(op):
        words = op.split()
        return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]

    used = {mnemonic(op) for _, op in instr if op}
    for kind in ("UTCHMMA", "UTCQMMA", "UTCMMA", "HGMMA", "HMMA", "IMMA"):  # UTC*: Blackwell tcgen05
        if kind in used:
            st.mma = kind
            break
    def load_bytes(body):
        total = 0
        for op in body:
            m = re.search(r"\bLDG\.E((?:\.64|\.128|\.U16|\.S16|\.U8)?)", op)
            if m:
                total += _LDG_BYTES.get(m.group(1), 4)
        return total

    # the streaming loop: the innermost loop loading the most bytes from global memory per trip
    # (else the largest innermost loop: tile loops load through shared memory)
    best = None
    for lo, hi in innermost:
        body = [op for a, op in instr if lo <= a <= hi]
        key = (load_bytes(body), len(body))
        if best is None or key > best[0]:
            best = (key, body)
    if best is not None:
        body = best[1]
        st.loop = len(body)
        st.loop_barriers = sum(1 for op in body if is_bar(op))
        st.loop_load_bytes = load_bytes(body)
    return st


def compile_triton(fn, signature, constexprs, attrs, options, arch, tmp, tool, sass):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs = triton.knobs
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=options.__dict__)
    text = log.getvalue()
    regs = [int(x) for x in _REG.findall(text)]
    spills = sum(int(a) + int(b) for a, b in _SPILL.findall(text))
    counts = sass_stats(kernel.asm["cubin"], tmp, tool) if sass else Sass()
    return (max(regs) if regs else -1), spills, int(kernel.metadata.shared), counts


def check(r: Result):
    low_precision = r.dtype in ("bf16", "fp16")
    if r.error:
        r.problems.append("compile error")
    if r.spill_bytes and low_precision:
        r.problems.append(f"{r.spill_bytes} bytes of register spills")
    limit = SMEM_LIMIT.get(r.arch)
    if limit is not None and r.smem > limit:
        r.problems.append(f"shared memory {r.smem} > {limit}")


def run_triton(archs, sass, only=None) -> list[Result]:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="fastalign-aot-cache-")
    triton.knobs.compilation.always_compile = True
    tool = _cuobjdump()
    results = []
    seen = set()  # a specialisation that several cases launch is compiled (and listed) once, for the first
    tmp = Path(tempfile.mkdtemp(prefix="fastalign-aot-"))
    try:
        for arch in archs:
            for family, cases, dtypes in FAMILIES:
                if only and only not in family:
                    continue
                for dname in dtypes:
                    if arch >= 100 and dname == "fp16":  # the bf16 code path; sm_80 / sm_90 compile it
                        continue
                    for variant, launch in cases(_torch_dtype(dname)):
                        with capturing(arch) as calls:
                            try:
                                launch()
                            except Exception as e:  # a launcher that cannot even specialise
                                results.append(Result(family, variant, arch, dname, error=f"launcher: {e!r}"))
                                continue
                        for fn, signature, constexprs, attrs, options in calls:
                            key = (fn, dname, repr(signature), repr(constexprs), repr(attrs), repr(options))
                            if key in seen:
                                continue
                            seen.add(key)
                            r = Result(fn.__name__, variant, arch, dname)
                            try:
                                r.registers, r.spill_bytes, r.smem, r.sass = compile_triton(
                                    fn, signature, constexprs, attrs, options, arch, tmp, tool, sass)
                            except Exception as e:
                                lines = str(e).strip().splitlines() or [""]
                                where = f"{lines[0]} " if len(lines) > 1 else ""  # "at line:col:" of a CompilationError
                                r.error = f"{type(e).__name__}: {where}{lines[-1][:200]}"
                            results.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(triton.knobs.cache.dir, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- nvcc

_NV_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_NV_USED = re.compile(r"Used (\d+) registers")
_NV_SMEM = re.compile(r"(\d+) bytes smem")
_NV_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_DTYPE_OF = (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("double", "fp64"), ("float", "fp32"))


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str):
    """(kernel, dtype) from a demangled CUDA kernel name."""
    base = re.sub(r"^void\s+", "", name.replace("(anonymous namespace)", "").split("(")[0].strip())
    kernel = re.sub(r"<.*$", "", base).split("::")[-1]
    targs = base[len(re.sub(r"<.*$", "", base)):]
    dtype = next((d for key, d in _DTYPE_OF if key in targs), "")
    return kernel, dtype


def run_nvcc(archs, root: Path, sass: bool, only=None) -> tuple[list[Result], str]:
    """Device code of each csrc/cuda/*.cu (with ``only``: those whose file name contains it) compiled to a
    cubin per architecture (no host compile), ptxas -v parsed per kernel, SASS counted per kernel with ``sass``."""
    nvcc = shutil.which("nvcc")
    sources = sorted((root / "csrc" / "cuda").glob("*.cu"))
    if nvcc is None:
        return [], "nvcc not found: the CUDA C++ kernels were not compiled (install the CUDA toolkit to check them)"
    if not sources:
        return [], "no csrc/cuda/*.cu sources found next to the package (installed from a wheel?)"
    sources = [src for src in sources if not only or only in src.name]
    if not sources:
        return [], f"no csrc/cuda/*.cu source has {only!r} in its name: nvcc compiled nothing"
    import pybind11

    inc = ["-I", str(root / "csrc"), "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]
    tool = _cuobjdump() if sass else None
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="fastalign-aot-nvcc-"))
    jobs = [(src, a) for src in sources for a in archs]
    width = max(1, min(len(jobs), os.cpu_count() or 1))
    try:
        for i in range(0, len(jobs), width):
            procs = []
            for src, arch in jobs[i:i + width]:
                cubin = tmp / f"{src.stem}.sm_{arch}.cubin"
                cmd = [nvcc, "--cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v",
                       f"-arch=sm_{arch}", *inc, "-DFASTALIGN_WITH_CUDA=1", str(src), "-o", str(cubin)]
                procs.append((src, arch, cubin, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                                 stderr=subprocess.STDOUT, text=True)))
            for src, arch, cubin, p in procs:
                out, _ = p.communicate()
                if p.returncode != 0:
                    errors = [ln for ln in out.splitlines() if "error" in ln] or out.strip().splitlines() or ["failed"]
                    results.append(Result(src.name, "nvcc", arch, error=errors[0][:200]))
                    continue
                per_kernel = sass_stats_per_function(cubin.read_bytes(), tmp, tool) if tool else {}
                entries = []
                for b in re.split(r"(?=ptxas info\s+: Compiling entry function)", out):
                    m = _NV_ENTRY.search(b)
                    if not m:
                        continue
                    used, smem, spill = _NV_USED.search(b), _NV_SMEM.search(b), _NV_SPILL.search(b)
                    entries.append((m.group(1), int(used.group(1)) if used else -1, int(smem.group(1)) if smem else 0,
                                    (int(spill.group(2)) + int(spill.group(3))) if spill else 0))
                names = _demangle([e[0] for e in entries])
                for (mangled, regs, smem, spills), name in zip(entries, names):
                    kernel, dtype = _short(name)
                    variant = "nvcc full" if ", true>" in name else "nvcc lean" if ", false>" in name else "nvcc"
                    results.append(Result(f"{src.stem}.cu:{kernel}", variant, arch, dtype, regs, spills, smem,
                                          sass=per_kernel.get(mangled)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results, ""


# ----------------------------------------------------------------------------- report

_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def table(results) -> str:
    """One row per compiled kernel. With ``--sass``: instructions in the kernel, barriers, and of its
    largest innermost loop the instructions, barriers and instructions per element loaded."""
    head = ("kernel", "variant", "dtype", "arch", "regs", "spill B", "smem B", "SASS", "BAR", "loop", "loop BAR",
            "instr/elem", "MMA", "status")
    rows = []
    dash = lambda v: str(v) if v is not None and v >= 0 else "-"  # noqa: E731
    for r in results:
        status = "ok" if not (r.problems or r.error) else "FAIL: " + "; ".join(r.problems + ([r.error] if r.error else []))
        if r.spill_bytes and not r.problems:
            status = "ok (spills, not bf16/fp16)"
        sa = r.sass or Sass()
        per_elem = "-"
        if sa.loop > 0 and sa.loop_load_bytes and r.dtype in _ELEM_BYTES:
            per_elem = f"{sa.loop / (sa.loop_load_bytes / _ELEM_BYTES[r.dtype]):.1f}"
        rows.append((r.kernel, r.variant, r.dtype, f"sm_{r.arch}", dash(r.registers), str(r.spill_bytes),
                     str(r.smem), dash(sa.total), dash(sa.barriers), dash(sa.loop), dash(sa.loop_barriers), per_elem,
                     sa.mma, status))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    return probe


def supported_archs(requested):
    """The requested architectures the installed Triton compiles for (a probe kernel compiles)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    probe = _probe_kernel()
    out = []
    for a in requested:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                triton.compile(ASTSource(probe, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {(1,): 64}),
                               target=GPUTarget("cuda", a, 32))
        except Exception:
            continue
        out.append(a)
    return out


def nvcc_archs(requested):
    """The requested architectures the installed nvcc targets (all of them without nvcc: its compile reports that
    it is missing)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return requested
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    return [a for a in requested if f"compute_{a}" in listed]


def _archs(text: str) -> list:
    """``--arch``: comma-separated compute capabilities, e.g. ``80,90,100``."""
    items = [a.strip() for a in text.split(",") if a.strip()]
    if not items or not all(a.isdigit() for a in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated compute capabilities such as 80,90,100, "
                                         f"got {text!r}")
    return list(dict.fromkeys(int(a) for a in items))


def main(argv=None) -> int:
    # set before any kernel compiles (the architecture probe included): Triton warns when it is unset
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = argparse.ArgumentParser(prog="python -m fastalign.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=_archs("80,90,100"), type=_archs,
                   help="comma-separated compute capabilities (default 80,90,100; those the installed Triton's "
                        "ptxas cannot target are left out with a note)")
    p.add_argument("--no-nvcc", action="store_true", help="skip the csrc/cuda/*.cu compile")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--sass", action="store_true", help="count SASS instructions and barriers (cuobjdump)")
    p.add_argument("--only", default=None, metavar="NAME",
                   help="only the Triton kernel families and the csrc/cuda/*.cu files whose name contains NAME")
    args = p.parse_args(argv)
    if args.no_triton and args.no_nvcc:
        p.error("--no-triton and --no-nvcc together leave nothing to compile")
    if not args.no_triton and importlib.util.find_spec("triton") is None:
        p.error("the Triton kernels need the triton package (pip install triton), or pass --no-triton")
    requested = args.arch
    t0 = time.time()
    results, notes = [], []
    compiled = set()  # the architectures some compiler targeted
    if not args.no_triton:
        archs = supported_archs(requested)
        for a in sorted(set(requested) - set(archs)):
            notes.append(f"sm_{a}: not supported by the installed Triton's ptxas; its Triton kernels not compiled")
        results += run_triton(archs, args.sass, args.only)
        compiled.update(archs)
    if not args.no_nvcc:
        root = Path(__file__).resolve().parent.parent
        archs = nvcc_archs(requested)
        for a in sorted(set(requested) - set(archs)):
            notes.append(f"sm_{a}: not a target of the installed nvcc; the CUDA sources not compiled for it")
        if archs:
            nv, note = run_nvcc(archs, root, args.sass, args.only)
            results += nv
            if note:
                notes.append(note)
        compiled.update(archs)
    for a in sorted(set(requested) - set(SMEM_LIMIT)):
        notes.append(f"sm_{a}: no per-block shared memory limit known here; shared memory not checked for it")
    for r in results:
        check(r)
    print(table(results))
    for n in notes:
        print("note:", n)
    bad = [r for r in results if r.problems]
    if not results:
        cuda_sources = (Path(__file__).resolve().parent.parent / "csrc" / "cuda").glob("*.cu")
        unmatched = args.only and not any(args.only in f for f, _, _ in FAMILIES) and \
            not any(args.only in src.name for src in cuda_sources)
        why = (f"no Triton kernel family ({', '.join(f for f, _, _ in FAMILIES)}) or csrc/cuda/*.cu file name "
               f"contains --only {args.only!r}" if unmatched else "no kernel was compiled (see the notes above)")
        print(f"\nAOT gate: {why}; failing")
        return 1
    print(f"\nAOT gate: {len(results)} kernel compilations for sm_{', sm_'.join(map(str, sorted(compiled)))} "
          f"in {time.time() - t0:.0f} s; {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
