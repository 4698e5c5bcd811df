# `make test` and `make bench` work on a fresh machine: they create .venv,
# install torch==2.13.0 (the CPU build) when no torch is importable — never a
# bare `torch`, which would pull a multi-GB CUDA build — then the package.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# verl pins a CUDA training stack; its loss and advantage code needs only the test extra.
VERL_PIN ?= verl==0.9.1
PYTEST_ARGS ?=

.PHONY: test bench install wheel wheel-check clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

install: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH_PIN)
	$(VPY) -m pip install -q scikit-build-core pybind11 ninja
	$(VPY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	$(VPY) -m pip install -q --no-deps $(VERL_PIN)

test: install
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VPY) -m fastalign.bench --quick

wheel: $(VPY)
	$(VPY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf build dist .venv *.egg-info

# Build a wheel with pip's isolated build (no torch in it), install it into a
# fresh venv next to torch==2.13.0, and run token_logprobs on the CPU.
wheel-check:
	rm -rf build/wheel-check && mkdir -p build/wheel-check
	$(PY) -m pip wheel -q --no-deps -w build/wheel-check/dist .
	$(PY) -m venv build/wheel-check/venv
	build/wheel-check/venv/bin/pip install -q $(TORCH_PIN)
	build/wheel-check/venv/bin/pip install -q build/wheel-check/dist/fastalign-*.whl
	cd build/wheel-check && venv/bin/python -c "import torch, fastalign; \
	x = torch.randn(4, 100, requires_grad=True); y = torch.randint(0, 100, (4,)); \
	st = fastalign.token_logprobs(x, y, entropy=True); st.logprobs.sum().backward(); \
	ref = torch.log_softmax(x.detach(), -1).gather(-1, y[:, None])[:, 0]; \
	assert torch.allclose(st.logprobs, ref, atol=1e-5), 'wrong log-probs'; \
	import fastalign.kernels; print('wheel ok:', fastalign.__file__)"

.PHONY: aot gpu-check

# Ahead-of-time compile gate (no GPU needed): every Triton kernel through its launcher
# at realistic shapes for sm_80 and sm_90, and csrc/cuda/*.cu with nvcc -Xptxas -v.
aot: install
	$(VPY) -m fastalign.aot --sass

# On a machine with a CUDA GPU (H100/H200): build, GPU tests, compute-sanitizer, GPU benchmark;
# results in benchmarks/results/. Fails cleanly without a GPU.
gpu-check:
	PY=$(PY) bash benchmarks/gpu_check.sh
