# The two commands of the README. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines here install torch from local wheels; on a cluster set TORCH to your CUDA build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Fixed: recipes/demo.yaml writes there.
DEMO := runs/demo
PYTEST_ARGS ?=

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Toy shards -> untrained score -> train -> trained score -> runs/demo/metrics.json (about 6 minutes on 2 cores).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m zoo data toy --out $(DEMO)/data --train 4096 --val 32 --test 128 --seed 0 --resolution 32
	$(PY) -m zoo test --config recipes/dim_edit_stage1.yaml --config recipes/tiny/dim.yaml --config recipes/demo.yaml \
		--trainer.logger.init_args.version=untrained --trainer.callbacks+=callbacks.toy_score.ToyEditEvaluator \
		--trainer.callbacks.label=untrained
	$(PY) -m zoo fit --config recipes/dim_edit_stage1.yaml --config recipes/tiny/dim.yaml --config recipes/demo.yaml \
		--trainer.logger.init_args.version=train
	$(PY) -m zoo test --config recipes/dim_edit_stage1.yaml --config recipes/tiny/dim.yaml --config recipes/demo.yaml \
		--trainer.logger.init_args.version=trained --trainer.callbacks+=callbacks.toy_score.ToyEditEvaluator \
		--trainer.callbacks.label=trained --ckpt_path $(DEMO)/train/checkpoints/last.ckpt
	$(PY) -m zoo toy-report $(DEMO)/untrained/metrics.json $(DEMO)/trained/metrics.json --out $(DEMO)/metrics.json
