# Each target creates .venv (if missing) and installs what it needs.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP_BASE := $(VENV)/.installed-base
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test test-cpu test-sim test-ptx test-notebooks bench clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP_BASE): $(VPY) setup.cfg pyproject.toml
	$(VPY) -m pip install -q -e .
	touch $@

$(STAMP_TEST): $(STAMP_BASE)
	$(VPY) -m pip install -q -e ".[test]"
	touch $@

## make demo: check every op on every available backend against the reference and print a table
demo: $(STAMP_BASE)
	$(VPY) -m numba_kernels

## make test: CPU tests (JIT on), CUDA-simulator tests in their own process, PTX compile for cc 9.0, notebooks
test: $(STAMP_TEST)
	bash tests/run_all.sh $(VPY)

bench: $(STAMP_BASE)
	$(VPY) benchmarks/bench_flash_attention.py

clean:
	rm -rf $(VENV) build *.egg-info
