# The front door. `make help` lists the targets.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PYTHONPATH := $(CURDIR)
# DVC runs `python -m stages.<name>`: the project's .venv must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
UI_PORT ?= 5000
SERVE_PORT ?= 5001
MODEL ?= models:/ijepa-classifier@repro
TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
REMOTE ?= $(CURDIR)/../ijepa-dvc-remote
SEEDS ?= 0 1 2
OBJECTIVE ?= ijepa
STAGE ?= pretrain
PREFIX ?= seeds
GRID ?= scripts/study_demo.yaml
STUDY_SEEDS ?= 0

.PHONY: help setup repro seeds study seed-table monitor-collapse params test test-fast lint format bench ui serve remote clean pretrain-slurm stage-slurm bench-gpu slurm-up slurm-down

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}' | sed 's/$$(UI_PORT)/$(UI_PORT)/; s/$$(SERVE_PORT)/$(SERVE_PORT)/'

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh scripts/install_system_deps.sh
	bash scripts/setup.sh

setup: $(STAMP) ## create .venv with the pinned dependencies and install the Debian packages

repro: $(STAMP) ## run the whole DVC chain on the built-in demo data (dvc repro), then print each stage's time
	$(PY) scripts/time_repro.py

seeds: $(STAMP) ## the whole chain once per seed as DVC experiments (SEEDS="0 1 2" OBJECTIVE=ijepa|dmt_jepa ARGS="-S ..."), then the seed table
	for s in $(SEEDS); do \
		dvc exp run --temp -n $(PREFIX)-$(OBJECTIVE)-seed$$s -S seed=$$s -S objective=$(OBJECTIVE) $(ARGS) || exit 1; \
	done
	$(PY) scripts/seed_table.py --prefix $(PREFIX)

monitor-collapse: $(STAMP) ## pretrain at the collapsing lr 1.5e-3 (an experiment), then plot its health beside the workspace run's
	dvc exp run --temp -n collapse-lr1.5e-3 -S optim.lr=0.0015 pretrain
	$(PY) scripts/plot_monitor.py --exp collapse-lr1.5e-3 --label "demo (lr 1.5e-4)" --out docs/monitor_collapse.png

study: $(STAMP) ## a recipe study: GRID's variants as DVC experiments (STUDY_SEEDS="0"), then one table of time and results
	$(PY) scripts/recipe_study.py $(GRID) --seeds $(STUDY_SEEDS) $(ARGS)

seed-table: $(STAMP) ## print the seed table of the experiments `make seeds` ran (PREFIX=seeds)
	$(PY) scripts/seed_table.py --prefix $(PREFIX)

pretrain-slurm: $(STAMP) ## pretraining as a SLURM job from inside the chain: `dvc exp run -S launcher=slurm $(ARGS) pretrain` (ARGS="-S launcher.nodes=2 -S launcher.partition=gpu")
	dvc exp run -S launcher=slurm $(ARGS) pretrain

stage-slurm: $(STAMP) ## STAGE=pretrain|finetune|extract|seg_train|attnprobe (and what it needs) as SLURM jobs from inside the chain (ARGS as pretrain-slurm)
	dvc exp run -S launcher=slurm $(ARGS) $(STAGE)

slurm-up: ## (root) install and start a one-node SLURM on localhost to try `make pretrain-slurm`
	bash scripts/local_slurm.sh start

slurm-down: ## stop the local SLURM started by slurm-up
	bash scripts/local_slurm.sh stop

params: $(STAMP) ## recompose params.yaml from params/ (what `dvc exp run` does) after editing params/
	$(PY) scripts/compose_params.py

ui: $(STAMP) ## serve the MLflow UI for this project's store on http://127.0.0.1:$(UI_PORT)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

serve: $(STAMP) ## serve a registered model over HTTP on http://127.0.0.1:$(SERVE_PORT) (MODEL=models:/ijepa-classifier@repro)
	MLFLOW_TRACKING_URI=$(TRACKING_URI) mlflow models serve -m "$(MODEL)" --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

remote: $(STAMP) ## make REMOTE (a folder or any DVC URL; default ../ijepa-dvc-remote) the default DVC remote, for dvc push / pull
	dvc remote add --force --default shared "$(REMOTE)"
	@echo "remote: 'shared' -> $(REMOTE) in .dvc/config (commit it to share); now dvc push, and dvc pull in another clone"

# Two workers on two cores, one thread per process: torch's default of a thread per core in every worker and every
# stage it starts oversubscribes the cores (docs/pipeline.md: 375 s instead of 468 s of pytest, side by side)
test: $(STAMP) ## run the whole test suite (two pytest-xdist workers; COV=1 adds line coverage of the three packages)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 $(if $(COV),--cov=ijepa --cov=pipeline --cov=stages --cov-report=term)

test-fast: $(STAMP) ## the edit-run loop: every test but the DVC chains, SLURM and the ones that start processes
	$(PY) -m pytest -q -m "not slow and not process" --durations=5

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## run the benchmarks (medians printed; numbers quoted in docs/benchmarks.md)
	$(PY) benchmarks/bench_matmul.py
	$(PY) benchmarks/bench_collator.py
	$(PY) benchmarks/bench_pretrain_step.py
	$(PY) benchmarks/bench_demo_loading.py
	$(PY) benchmarks/bench_monitor.py
	$(PY) benchmarks/bench_data.py --epochs 5

bench-gpu: $(STAMP) ## the GPU pretraining step (vit_base/16, vit_huge/14 at 224, bf16, compile) and the GPU tests; says so without CUDA
	$(PY) benchmarks/bench_gpu.py
	$(PY) -m pytest -q -m gpu

clean: ## remove caches (keeps .venv, data and mlflow.db)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
