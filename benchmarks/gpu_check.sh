#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA GPU, in one command (< 8 minutes on an H100/H200;
# each step has its own time limit, 9.5 minutes in all, so a hang cannot take the whole run).
#
#   1. build the package with its CUDA kernels (pip install --no-build-isolation -e .)
#   2. pytest -m gpu (Triton + CUDA kernels against float64 references, linear backward in bf16 at V=151936)
#   3. compute-sanitizer memcheck on the GPU kernel tests (when compute-sanitizer is installed)
#   4. the GPU benchmark: token_logprobs [8192 x 151936] bf16 against the one-read bandwidth limit,
#      linear_logprobs N=8192 H=4096 V=151936 bf16 fwd and fwd+bwd against the dense tensor-core
#      limit, also with half of every sequence an unscored prompt (with and without device compaction),
#      the SFT loss (token-mean cross-entropy: the single pass in blocks of tokens, the two passes,
#      Liger's and cut-cross-entropy's fused linear cross-entropy) and LinearPolicyLoss (GRPO) at B=8
#      T=1024 on that head, with the installed peers
#
# Everything lands in benchmarks/results/gpu-check-<device>-<UTC time>/ (or $GPU_CHECK_OUT) with the
# device, date and versions (env.txt) and a one-line status per step (summary.txt): seven files, each
# written as its step ends, so a run cut short still leaves what it did. Exit status: 0 when every
# step passed, 1 when one failed, 2 when no CUDA device is visible (nothing is run).
#
# Third-party peers for the benchmark (Liger-Kernel, cut-cross-entropy, TRL) are used when importable;
# on a machine without network, `make gpu-peers` downloads their wheels into .whl/ beforehand and
# this script installs them from there (into a separate folder, without touching the environment).
# The CUDA kernels are built for this device's architecture only unless FASTALIGN_CUDA_ARCHS is set.
# GPU_CHECK_COMMIT names the commit where the copy being checked has no git history.
set -u
PY=${PY:-python3}
cd "$(dirname "$0")/.."

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA device visible to torch under $PY; nothing was run." >&2
  exit 2
fi

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z')
out=${GPU_CHECK_OUT:-"benchmarks/results/gpu-check-${device}-$(date -u +%Y%m%dT%H%M%SZ)"}
mkdir -p "$out"
if [ -z "${FASTALIGN_CUDA_ARCHS:-}" ]; then
  FASTALIGN_CUDA_ARCHS=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'{a}{b}-real')")
  export FASTALIGN_CUDA_ARCHS
fi
bench_path=${PYTHONPATH:-}  # the benchmark's import path: the peers' wheels (make gpu-peers) first
if ls .whl/*.whl >/dev/null 2>&1; then
  peers=${TMPDIR:-/tmp}/fastalign-peers
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$peers" .whl/*.whl \
    && bench_path="$peers${bench_path:+:$bench_path}"
fi
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $out/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local verdict=passed
  [ $rc -eq 0 ] || { verdict="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"; status=1; }
  printf '%-12s %-40s %4ss\n' "$name" "$verdict" "$((SECONDS - t0))" | tee -a "$out/summary.txt"
  return $rc
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  PYTHONPATH="$bench_path" "$PY" - <<'EOF'
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
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

echo "CUDA architectures built: $FASTALIGN_CUDA_ARCHS" >>"$out/env.txt"

step build 120 "$PY" -m pip install --no-build-isolation -e . || echo "build failed: see $out/build.log" >&2
"$PY" -c "import fastalign._backend as b; print('CUDA kernels compiled:', b.cuda_kernels_available())" 2>&1 \
  | tee -a "$out/summary.txt"
step pytest-gpu 140 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests/
if command -v compute-sanitizer >/dev/null 2>&1; then
  # without the caching allocator every tensor is its own allocation, so an overrun is caught
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 80 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kernels.py -k "not full_vocabulary"
else
  echo "memcheck     skipped: compute-sanitizer not installed" | tee -a "$out/summary.txt"
fi
PYTHONPATH="$bench_path" step bench 230 "$PY" -m fastalign.bench --device cuda \
  --ops token_logprobs,linear_logprobs,linear_cross_entropy,linear_policy_loss,linear_divergence --cases 8192x151936,8192x4096x151936,"T=1024 H=4096",8192x4096/6144x151936 --repeats 10 --budget 6 --total-budget 200 --json "$out/bench.json"
echo "gpu-check: results in $out" | tee -a "$out/summary.txt"
exit $status
