#!/usr/bin/env bash
# The release check (`make wheel-check`, run by CI):
#   1. the sdist carries what a source build needs (csrc/, fastalign/kernels/, CMakeLists.txt);
#   2. a portable wheel, built by pip's isolated build (tools/build_wheels.sh),
#      repaired by auditwheel, with a manylinux tag no newer than 2_28, carrying the
#      CUDA kernels (device code checked by tools/build_wheels.sh) when nvcc is found;
#   3. that wheel installed into a fresh venv beside torch (CPU), every public
#      op run once from an empty directory (tools/wheel_smoke.py), and
#      `python -m fastalign.info`;
#   4. on x86-64, the installed _C's AVX2 and AVX-512 kernel variants really use
#      ymm / zmm registers and FMA (tools/isa_check.py, needs objdump).
# PY: the interpreter to build for and test with; TORCH_PIN: the torch to test beside.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
AUDITWHEEL=${AUDITWHEEL:-auditwheel}
work=build/wheel-check
rm -rf "$work"
mkdir -p "$work"
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

step "sdist"
"$PY" -m build --sdist -o "$work/sdist" . >"$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/sdist/fastalign-*.tar.gz)
tar tzf "$sdist" > "$work/sdist.txt"
for need in CMakeLists.txt pyproject.toml csrc/module.cpp csrc/portable/omp_runtime.cpp fastalign/kernels/token_stats.py \
            fastalign/__init__.py fastalign/info/__init__.py; do
  grep -q "^fastalign-[^/]*/$need\$" "$work/sdist.txt" || { echo "sdist lacks $need"; exit 1; }
done
echo "sdist ok: $(basename "$sdist"), $(wc -l < "$work/sdist.txt") files, $(grep -c '/csrc/' "$work/sdist.txt") under csrc/"

step "portable wheel (pip isolated build, auditwheel repair)"
OUT="$work/dist" AUDITWHEEL="$AUDITWHEEL" tools/build_wheels.sh "$PY"
whl=$(ls "$work"/dist/fastalign-*manylinux*.whl)
tag=$(basename "$whl" .whl | cut -d- -f5)
echo "wheel: $(basename "$whl")"
echo "platform tag: $tag"
newest=$(echo "$tag" | tr '.' '\n' | sed -n 's/^manylinux_2_\([0-9]*\)_.*/\1/p' | sort -n | tail -1)
[ -n "$newest" ] && [ "$newest" -le 28 ] || { echo "expected a manylinux_2_28 tag or older, got $tag"; exit 1; }

step "fresh venv: $TORCH_PIN (CPU) and the wheel"
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q "$TORCH_PIN" "$whl"
"$work/venv/bin/pip" list 2>/dev/null | grep -iE "^(fastalign|torch) "

step "every public op from the installed wheel"
run=$(mktemp -d)
cp tools/wheel_smoke.py "$run/"
(cd "$run" && "$OLDPWD/$work/venv/bin/python" wheel_smoke.py)

step "python -m fastalign.info"
(cd "$run" && "$OLDPWD/$work/venv/bin/python" -m fastalign.info)

step "the wheel's CUDA kernels"
want_cuda=${FASTALIGN_CUDA:-$(command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)}
have_cuda=$(cd "$run" && "$OLDPWD/$work/venv/bin/python" -c \
  "from fastalign import _C; print(int(_C.cuda_compiled), _C.build_info().get('cuda_archs', ''))")
echo "cuda_compiled, archs: $have_cuda (expected CUDA kernels: $want_cuda)"
[ "${have_cuda%% *}" = "$want_cuda" ] || { echo "the wheel's CUDA kernels are not what the build asked for"; exit 1; }

step "the wheel's AVX2 / AVX-512 kernel variants (objdump of the installed _C)"
cp tools/isa_check.py "$run/"
(cd "$run" && "$OLDPWD/$work/venv/bin/python" isa_check.py)
rm -rf "$run"
step "wheel check passed"
