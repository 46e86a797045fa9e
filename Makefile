# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Local only: no usage analytics, no update checks.
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# Prefect state (server database, settings) per checkout, not the global ~/.prefect: a second
# checkout's `make ui` must not attach to the first one's server and deployment.
export PREFECT_HOME := $(CURDIR)/.prefect
# An ephemeral Prefect server (make run without make ui) needs more than 20 s on a busy CPU.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000

.PHONY: setup run test lint clean ui mlflow-ui gpu-check team-services

setup: $(STAMP)

# CPU install: torch/torchvision pinned (local wheels, no multi-GB download), mlflow pinned.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[pipeline,lora,dev]'
	touch $(STAMP)

# The whole DAG as the Prefect flow (flows/pipeline.py: one task per DVC stage, only what
# changed reruns) under one MLflow parent run, ending with the comparison of the variants.
# Shown live in `make ui` when its server is up; otherwise an ephemeral server records the
# run in .prefect/, where `make ui` shows it later.
run: setup
	@url=$$($(PY) -m flows.serve --api-url $(PREFECT_PORT)); \
	if [ -n "$$url" ]; then echo "Prefect UI: $${url%/api}"; export PREFECT_API_URL=$$url; fi; \
	$(PY) -m flows.pipeline

test: setup
	$(PY) -m pytest

# Every GPU measurement in one call of <= 8 minutes, on a GPU machine with torch, transformers,
# accelerate, peft, pandas and pytest (no install, no network; benchmarks/README.md):
# results in $(GPU_CHECK_OUT)/gpu_check.{json,md,log}. `make gpu-check GPU_CHECK_ARGS=--dry-run`
# runs the same parts on CPU with the tiny model in the project's venv.
GPU_CHECK_OUT ?= results/gpu-check
GPU_CHECK_ARGS ?=
GPU_PYTHON ?= $(if $(filter --dry-run,$(GPU_CHECK_ARGS)),$(PY),python3)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS) $(GPU_CHECK_OUT)

lint: setup
	$(VENV)/bin/ruff check appo flows tests benchmarks

# Prefect UI on 127.0.0.1 plus the pipeline deployment (trigger runs with parameters there);
# refuses a port in use before printing anything.
ui: setup
	@$(PY) -m flows.serve --check-port $(PREFECT_PORT)
	@$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & server=$$!; \
	trap 'kill $$server' EXIT INT TERM; \
	echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)  (deployment appo-pipeline/appo-pipeline)"; \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(PY) -m flows.serve --wait 120

# MLflow UI on 127.0.0.1 over the local sqlite store the stages log to.
mlflow-ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db

# Team services for sweeps over several machines (README: Running on a cluster): a Prefect
# server, an MLflow tracking server and a folder DVC remote under team/, in the foreground
# (Ctrl-C stops them); TEAM_HOST=0.0.0.0 listens for the other machines.
TEAM_HOST ?= 127.0.0.1
team-services: setup
	$(PY) -m flows.cluster services --dir team --host $(TEAM_HOST) \
		--prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

clean:
	rm -rf data models outputs mlruns mlflow.db
