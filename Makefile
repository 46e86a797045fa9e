# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint clean

setup: $(STAMP)

# CPU install: torch/torchvision pinned (local wheels, no multi-GB download), mlflow pinned.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[pipeline,lora,dev]'
	touch $(STAMP)

run: setup
	$(PY) -m appo run

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check appo flows tests benchmarks

clean:
	rm -rf data models outputs mlruns mlflow.db
