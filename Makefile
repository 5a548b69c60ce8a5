# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# On a machine without CUDA the venv gets the CPU build torch==2.13.0. GPU users who already have a CUDA torch
# run `make TORCH_SPEC= test` inside their own environment (VENV=...) so their torch is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Pinned versions for the CPU venv only (see constraints.txt); a venv with its own torch keeps its own versions.
CONSTRAINTS ?= $(if $(TORCH_SPEC),-c constraints.txt,)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q $(CONSTRAINTS) "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lrq_ao.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check lrq_ao tests benchmarks
	$(VENV)/bin/ruff format --check lrq_ao tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format lrq_ao tests benchmarks
	$(VENV)/bin/ruff check --fix lrq_ao tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
