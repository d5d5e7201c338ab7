# mint-ray: everything installs itself into .venv (torch from the CPU wheel first,
# so pip never pulls a CUDA build).
PY := .venv/bin/python
PIP_LOG := .venv/pip.log

.PHONY: demo test lint bench services clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	@echo "installing Python packages into .venv (about 4 min on a fresh machine; log: $(PIP_LOG))"
	@$(PY) -m pip install -q torch==2.13.0 >$(PIP_LOG) 2>&1 || (tail -30 $(PIP_LOG); exit 1)
	@$(PY) -m pip install -q -e '.[dev]' >>$(PIP_LOG) 2>&1 || (tail -30 $(PIP_LOG); exit 1)
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia'; then echo "a CUDA package slipped in" >&2; exit 1; fi
	touch $@

# Ceph's S3 gateway (Debian packages) for the tests that use real S3.
.local/.services: infra/local/s3.sh
	infra/local/s3.sh install
	mkdir -p .local && touch $@

# DeepSpeed JIT-compiles its CPU comm op (and CPU Adam) on first use: build once.
.local/.ds_ops: .venv/.installed
	DS_ACCELERATOR=cpu $(PY) -m tools.prebuild_ops
	mkdir -p .local && touch $@

demo: .venv/.installed .local/.ds_ops
	RAY_AUTH_MODE=disabled DS_ACCELERATOR=cpu .venv/bin/mint-ray demo

lint: .venv/.installed
	.venv/bin/ruff check .

test: .venv/.installed .local/.services .local/.ds_ops lint
	RAY_AUTH_MODE=disabled DS_ACCELERATOR=cpu $(PY) -m pytest -q -ra --durations=15

bench: .venv/.installed .local/.ds_ops
	for b in packing training preferences serving; do \
	  RAY_AUTH_MODE=disabled DS_ACCELERATOR=cpu $(PY) benchmarks/bench_$$b.py || exit 1; done

clean:
	rm -rf .venv .local mint-data
