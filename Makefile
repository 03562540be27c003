# make test / make bench work on a fresh machine: they create .venv, install torch and the
# project (C++ always; CUDA when a toolkit is found, see setup.py: CUDA_HOME, else the toolkit of
# nvcc, else /usr/local/cuda; architectures: TORCH_CUDA_ARCH_LIST, else the GPUs present, else
# setup.py's default list).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
TORCH   ?= torch==2.14.1
DEPS    := numpy hypothesis pytest pytest-xdist scikit-learn matplotlib tqdm liger-kernel ruff transformers accelerate
STAMP   := $(VENV)/.deps-stamp
# Parallel compile jobs of this build only (not exported: `make gpu-check` sizes its own build).
BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: venv build test bench lint clean gpu-check

$(STAMP): Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q $(TORCH) $(DEPS)
	touch $(STAMP)

venv: $(STAMP)

EDITABLE := $(VENV)/.editable-stamp

# Register the package once (no compilation: FUSEDLOSS_NO_EXT), then build the extensions in
# place; build_ext is incremental (a 2 s no-op when nothing changed).
$(EDITABLE): $(STAMP) setup.py pyproject.toml
	FUSEDLOSS_NO_EXT=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(EDITABLE)

build: $(EDITABLE)
	MAX_JOBS=$${MAX_JOBS:-$(BUILD_JOBS)} $(VPY) setup.py -q build_ext --inplace

test: build lint
	$(VPY) -m pytest -q -n 2 tests

bench: build
	$(VPY) benchmarks/run.py

# On the GPU machine (torch preinstalled there, nothing of ours): see scripts/gpu_check.sh.
gpu-check:
	bash scripts/gpu_check.sh

lint: $(STAMP)
	$(VPY) -m ruff check python triton_kernels tests benchmarks examples

clean:
	rm -rf build python/fusedloss/*.so python/*.egg-info
