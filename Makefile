# `make test` and `make bench` work on a fresh machine: they create .venv,
# install torch==2.13.0 (the CPU build) when no torch is importable — never a
# bare `torch`, which would pull a multi-GB CUDA build — then the package.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test bench install wheel clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

install: $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH_PIN)
	$(VPY) -m pip install -q scikit-build-core pybind11 ninja
	$(VPY) -m pip install -q --no-build-isolation -e ".[test,bench]"

test: install
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VPY) -m fastalign.bench --quick

wheel: $(VPY)
	$(VPY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf build dist .venv *.egg-info
