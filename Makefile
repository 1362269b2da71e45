# The two commands of the README. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/storage
export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast ui install benchmark

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a loose torch requirement resolved by pip may pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

storage/dagster.yaml: dagster.yaml
	mkdir -p storage && cp dagster.yaml storage/dagster.yaml

run: install storage/dagster.yaml
	$(BIN)/python -m prism_assets run

test: install storage/dagster.yaml
	$(BIN)/python -m pytest

test-fast: install storage/dagster.yaml
	$(BIN)/python -m pytest -m 'not slow'

ui: install storage/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

benchmark: install
	$(BIN)/python benchmarks/pipeline_speed.py
