# make test / make bench work on a fresh machine: they create .venv, install torch and the
# project (C++ always; CUDA when the toolkit is there, see ../shared/ENVIRONMENT.md).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
TORCH   ?= torch==2.14.1
DEPS    := numpy hypothesis pytest pytest-xdist scikit-learn matplotlib tqdm liger-kernel ruff transformers
STAMP   := $(VENV)/.deps-stamp
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

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
	$(VPY) setup.py -q build_ext --inplace

test: build lint
	$(VPY) -m pytest -q -n 2 tests

bench: build
	$(VPY) benchmarks/run.py

# On the GPU machine (torch preinstalled there): build, CUDA tests, compute-sanitizer, GPU bench.
gpu-check:
	PY=$${PY:-python3} bash scripts/gpu_check.sh

lint: $(STAMP)
	$(VPY) -m ruff check python triton_kernels tests benchmarks examples

clean:
	rm -rf build python/fusedloss/*.so python/*.egg-info
