#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA GPU, in one command (< 8 minutes on an H100/H200).
#
#   1. build the package with its CUDA kernels (pip install --no-build-isolation -e .)
#   2. pytest -m gpu (Triton + CUDA kernels against float64 references, linear backward in bf16 at V=151936)
#   3. compute-sanitizer memcheck on the GPU kernel tests (when compute-sanitizer is installed)
#   4. the GPU benchmark: token_logprobs [8192 x 151936] bf16 against the one-read bandwidth limit,
#      linear_logprobs N=8192 H=4096 V=151936 bf16 fwd and fwd+bwd against the dense tensor-core
#      limit, with the installed peers
#
# Everything lands in benchmarks/results/gpu-check-<device>-<UTC time>/ with the device, date and
# versions (env.txt) and a one-line status per step (summary.txt). Exit status: 0 when every step
# passed, 1 when one failed, 2 when no CUDA device is visible (nothing is run).
set -u
PY=${PY:-python3}
cd "$(dirname "$0")/.."

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA device visible to torch under $PY; nothing was run." >&2
  exit 2
fi

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z')
out="benchmarks/results/gpu-check-${device}-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
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
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0),
      "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
for mod in ("triton", "liger_kernel", "cut_cross_entropy", "flash_attn", "trl", "verl"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "installed"))
    except Exception:
        print(mod, "not installed")
EOF
  nvcc --version 2>/dev/null | tail -1
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

step build 180 "$PY" -m pip install --no-build-isolation -e . || echo "build failed: see $out/build.log" >&2
"$PY" -c "import fastalign._backend as b; print('CUDA kernels compiled:', b.cuda_kernels_available())" \
  | tee -a "$out/summary.txt"
step pytest-gpu 90 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kernels.py -k "not full_vocabulary"
else
  echo "memcheck     skipped: compute-sanitizer not installed" | tee -a "$out/summary.txt"
fi
step bench 200 "$PY" -m fastalign.bench --device cuda --ops token_logprobs,linear_logprobs \
  --cases 8192x151936,8192x4096x151936 --repeats 10 --budget 6 --json "$out/bench.json"
cp "$out/bench.log" "$out/bench.txt" 2>/dev/null
echo "gpu-check: results in $out" | tee -a "$out/summary.txt"
exit $status
