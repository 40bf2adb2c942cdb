# Two commands do all set-up on a fresh machine:
#   make train   -> creates .venv, installs vlp_jax, pre-trains on the built-in catalog
#   make test    -> creates/reuses .venv, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/base
CONFIG ?= configs/base.py
ARGS ?=

.PHONY: venv train test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) -m vlp_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: venv
	$(PY) -m pytest tests $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
