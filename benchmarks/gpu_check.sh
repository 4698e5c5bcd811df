#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA GPU, in one command (< 8 minutes on an H100/H200;
# each step has its own time limit, and all of them together end within GPU_CHECK_BUDGET seconds of the start,
# default 540: a step gets what is left when that is less, and is skipped, saying so, under 15 s).
#
#   1. build the package with its CUDA kernels (pip install --no-build-isolation -e .)
#   2. pytest -m gpu (Triton + CUDA kernels against float64 references, linear backward in bf16 at V=151936)
#   3. compute-sanitizer memcheck on the GPU kernel tests (when compute-sanitizer is installed)
#   4. the GPU benchmark: token_logprobs [8192 x 151936] bf16 against the one-read bandwidth limit, the
#      Liger cross-entropy drop-in on a model's logits of that size (against Liger's kernel),
#      linear_logprobs N=8192 H=4096 V=151936 bf16 fwd and fwd+bwd against the dense tensor-core
#      limit, also with half of every sequence an unscored prompt (with and without device compaction),
#      the SFT loss (token-mean cross-entropy: the single pass in blocks of tokens, the two passes,
#      Liger's and cut-cross-entropy's fused linear cross-entropy) and LinearPolicyLoss (GRPO) at B=8
#      T=1024 on that head, with the installed peers; kl_penalty k3 (the Triton kernel) and masked_whiten
#      on [1024, 4096] tokens against eager PyTorch and torch.compile
#   5. on request (GPU_CHECK_STEPS=...,profile; not in the default steps, which fill the budget): where the
#      LM-head ops' time goes, kernel by kernel (benchmarks/profile_linear.py, torch.profiler), and the tilings
#      of their forward kernel and labelled-row products against torch.mm (benchmarks/lm_head_tilings.py)
#
# Everything lands in benchmarks/results/gpu-check-<device>-<UTC time>/ (or $GPU_CHECK_OUT) with the
# device, date and versions (env.txt) and a one-line status per step (summary.txt): seven files (eight with the
# profile), each
# written as its step ends (the benchmark's JSON after each of its cases), so a run cut short still leaves what
# it did. Exit status: 0 when every
# step passed, 1 when one failed, 2 when no CUDA device is visible (nothing is run).
#
# On a machine without network, `make gpu-peers` downloads beforehand into .whl/ the wheels of the build
# tools (scikit-build-core, pybind11, cmake, ninja), the test tools (pytest, pytest-benchmark, hypothesis,
# pytest-xdist, pytest-timeout)
# and the benchmark's third-party peers (Liger-Kernel, cut-cross-entropy, TRL); this script installs them
# from there (pip --no-index --find-links .whl, into a separate folder on PYTHONPATH for every step,
# without touching the environment), then names what is still missing (env.txt, summary.txt).
# torch (a CUDA build) and triton are the machine's own. `--deps-only` does only that (no GPU needed):
# exit 0 when everything the steps need is importable, 1 otherwise.
# The CUDA kernels are built for this device's architecture only unless FASTALIGN_CUDA_ARCHS is set.
# GPU_CHECK_COMMIT names the commit where the copy being checked has no git history (env.txt, and the benchmark's
# JSON through FASTALIGN_COMMIT). GPU_CHECK_STEPS (a comma list of step names: build,pytest-gpu,memcheck,bench,
# profile; default the first four) runs only those, to rerun a step after a fix;
# GPU_CHECK_TESTS narrows pytest-gpu and memcheck to some test files or node ids.
set -u
PY=${PY:-python3}
cd "$(dirname "$0")/.."
deps_only=0
[ "${1:-}" = --deps-only ] && deps_only=1

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu-check: torch is not installed under $PY (install a CUDA build of torch); nothing was run." >&2
  exit 2
fi
if [ $deps_only = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA device visible to torch $("$PY" -c "import torch; print(torch.__version__)") under $PY;" \
    "nothing was run." >&2
  exit 2
fi

# the wheels of .whl/ (make gpu-peers) in a folder of their own, first on every step's import path
# (the lists of `make gpu-peers`: benchmarks/gpu_tools.txt and gpu_peers.txt, one requirement a line)
requirements() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "benchmarks/$1" | grep -v '^$'; }
wheel_name() { printf '%s' "${1%%[=<>!~]*}" | tr 'A-Z.-' 'a-z__'; }  # a wheel file's: lower case, "_" for "-"
peers_dir=${TMPDIR:-/tmp}/fastalign-peers
if ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf "$peers_dir"
  # each tool with its dependencies (those in .whl/: a machine may carry the tools itself), then each peer
  # alone, so one that does not fit loses only itself
  for t in $(requirements gpu_tools.txt); do
    ls .whl/"$(wheel_name "$t")"-*.whl >/dev/null 2>&1 || continue
    "$PY" -m pip install -q --no-index --find-links .whl --no-compile --target "$peers_dir" "$t" 2>/dev/null \
      || echo "gpu-check: $t does not install from .whl/ here (make gpu-peers fetches it for Python 3.12)" >&2
  done
  for p in $(requirements gpu_peers.txt); do
    name=$(wheel_name "$p")
    for w in .whl/"$name"-*.whl; do
      [ -e "$w" ] || continue
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$peers_dir" "$w" 2>/dev/null \
        || echo "gpu-check: $(basename "$w") does not install here; the benchmark goes without it" >&2
    done
  done
  export PYTHONPATH="$peers_dir${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$peers_dir/bin:$PATH"
fi
# what the steps need and this machine still lacks
missing=$("$PY" - <<'EOF'
import importlib.util, shutil
need = {"triton": "triton (the GPU tests and benchmark)", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark",
        "hypothesis": "hypothesis", "scikit_build_core": "scikit-build-core (the build)",
        "pybind11": "pybind11 (the build)"}
gone = [what for mod, what in need.items() if importlib.util.find_spec(mod) is None]
gone += [f"{tool} (the build)" for tool in ("cmake", "ninja")  # a program, or its wheel's Python package
         if shutil.which(tool) is None and importlib.util.find_spec(tool) is None]
print(", ".join(gone))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu-check: missing under $PY: $missing (make gpu-peers on a machine with network, then copy .whl/ here)" >&2
fi
if [ $deps_only = 1 ]; then
  [ -z "$missing" ] && echo "gpu-check: everything the steps need is importable"
  [ -z "$missing" ]
  exit
fi

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z')
out=${GPU_CHECK_OUT:-"benchmarks/results/gpu-check-${device}-$(date -u +%Y%m%dT%H%M%SZ)"}
if ! mkdir -p "$out" || ! touch "$out/summary.txt"; then
  echo "gpu-check: cannot write the results folder $out; nothing was run." >&2
  exit 2
fi
commit=${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export FASTALIGN_COMMIT=$commit
budget=${GPU_CHECK_BUDGET:-540}
case $budget in
  '' | *[!0-9]*)
    echo "gpu-check: GPU_CHECK_BUDGET must be whole seconds, got '$budget'; nothing was run." >&2
    exit 2 ;;
esac
[ -z "$missing" ] || echo "missing      $missing" >>"$out/summary.txt"
if [ -z "${FASTALIGN_CUDA_ARCHS:-}" ]; then
  FASTALIGN_CUDA_ARCHS=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'{a}{b}-real')")
  export FASTALIGN_CUDA_ARCHS
fi
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  case ",${GPU_CHECK_STEPS:-build,pytest-gpu,memcheck,bench}," in
    *",$name,"*) ;;
    *) echo "$name skipped: not in GPU_CHECK_STEPS" | tee -a "$out/summary.txt"; return 0 ;;
  esac
  # SECONDS: since the script started; 15 s for the kill 10 s after a limit and the summary
  local left=$((budget - SECONDS - 15))
  if [ $left -lt 15 ]; then
    echo "$name skipped: ${left}s left of GPU_CHECK_BUDGET=${budget}s" | tee -a "$out/summary.txt"
    status=1
    return 1
  fi
  [ $limit -le $left ] || limit=$left
  local t0=$SECONDS
  # SIGTERM at the limit, SIGKILL 10 s later (a process stuck in the driver may ignore the first)
  timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local verdict=passed
  [ $rc -eq 0 ] || { verdict="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"; status=1; }
  printf '%-12s %-40s %4ss\n' "$name" "$verdict" "$((SECONDS - t0))" | tee -a "$out/summary.txt"
  return $rc
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $commit"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0),
      "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
for mod in ("triton", "numpy", "liger_kernel", "cut_cross_entropy", "flash_attn", "trl", "verl"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "installed"))
    except Exception:
        print(mod, "not installed")
EOF
  nvcc --version 2>/dev/null | tail -1
  echo "missing: ${missing:-nothing}"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

echo "CUDA architectures built: $FASTALIGN_CUDA_ARCHS" >>"$out/env.txt"

# a failed build still runs the steps: the Triton kernels need no fastalign._C (the tests of the C++/CUDA
# ones then fail or skip, which the summary shows)
# offline: no index, no version check (either waits on the network), the dependencies the machine's own
step build 140 "$PY" -m pip install --no-index --no-deps --disable-pip-version-check --no-build-isolation -e . \
  || echo "build did not pass (summary above, $out/build.log); the later steps run from the source tree" \
  | tee -a "$out/summary.txt" >&2
"$PY" -c "import fastalign._backend as b; print('CUDA kernels compiled:', b.cuda_kernels_available())" 2>&1 \
  | tee -a "$out/summary.txt"
# a test file that cannot be imported fails the step without stopping the other files' GPU tests; with
# pytest-xdist, four workers compile their Triton kernels side by side
# (the files that hold GPU tests; -v: a line per test, so a log cut by the time limit names the tests it ran)
tests=${GPU_CHECK_TESTS:-$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')}
parallel=()  # four workers with pytest-xdist, a minute per test at most with pytest-timeout, where installed
"$PY" -c "import xdist" 2>/dev/null && parallel=(-n 4)
"$PY" -c "import pytest_timeout" 2>/dev/null && parallel+=(--timeout 60)
step pytest-gpu 180 "$PY" -m pytest -m gpu -v -p no:cacheprovider -rs "${parallel[@]}" \
  --continue-on-collection-errors $tests
if command -v compute-sanitizer >/dev/null 2>&1; then
  # without the caching allocator every tensor is its own allocation, so an overrun is caught
  # (the kernels at small sizes: not the full-vocabulary and 8M-token cases, which memcheck slows 10-100x)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 50 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -m gpu -v -p no:cacheprovider ${GPU_CHECK_TESTS:-tests/test_gpu_kernels.py} \
    -k "not full_vocabulary and not past_65535 and not fp32_teacher"
else
  echo "memcheck     skipped: compute-sanitizer not installed" | tee -a "$out/summary.txt"
fi
# the benchmark's own budget ends its timed rounds by 105 s; the 35 s left to the step's limit are for a case's
# warm-up (Triton and torch.compile builds) and memory probe begun before that, which run to their end
step bench 140 "$PY" -m fastalign.bench --device cuda \
  --ops token_logprobs,cross_entropy,ce_tvd,jsd,grpo_logits,vocab_parallel_ce,linear_logprobs,linear_cross_entropy,linear_policy_loss,linear_divergence,linear_topk,kl_penalty,masked_whiten,soft_cross_entropy --cases 8192x151936,16x512x151936,2048x4x151936,8192x4096x151936,"T=1024 H=4096",8192x4096/6144x151936,"B=1024 T=4096" --repeats 10 --budget 6 --total-budget 105 --json "$out/bench.json"
step profile 110 bash -c '"$0" benchmarks/profile_linear.py && "$0" benchmarks/lm_head_tilings.py' "$PY"
echo "gpu-check: results in $out" | tee -a "$out/summary.txt"
exit $status
