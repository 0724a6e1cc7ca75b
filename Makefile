# The two commands of the README. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines here install torch from local wheels; on a cluster set TORCH to your CUDA build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Which tiny model `make demo` trains: dim, got, mind_edit or imgedit_e1.
MODEL ?= dim
PYTEST_ARGS ?=

.PHONY: demo test faults install bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fault-injection tests (marker faults) and their table: fault kind, injected, survived, data lost.
faults: $(STAMP)
	$(PY) -m pytest -q -m faults $(PYTEST_ARGS)

# Toy shards -> untrained score -> train -> trained score and ablations -> runs/demo/metrics.json
# (zoo/demo.py; MODEL=got for the tiny GoT, under runs/demo_got; MODEL=mind_edit under runs/demo_mind_edit). Fails if the trained model misses its bar.
demo: $(STAMP)
	$(PY) -m zoo demo $(MODEL)

# Every benchmark of benchmarks/README.md (a few minutes each on a CPU) -> benchmarks/results/<name>.{json,md}.
BENCHMARKS ?= data_streaming loop_overhead paper_size_cost feature_cache inference
bench: $(STAMP)
	for name in $(BENCHMARKS); do $(PY) -m benchmarks.$$name || exit 1; done
