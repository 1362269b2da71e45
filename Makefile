# The two commands of the README. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/storage
export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast lint ui install benchmark slurm-up slurm-down postgres-up postgres-down constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a loose torch requirement resolved by pip may pull a multi-GB CUDA build.
# Everything else at the versions the tests passed with (constraints.txt).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,trackers,postgres]'
	touch $@

install: $(VENV)/.installed

storage/dagster.yaml: dagster.yaml
	mkdir -p storage && cp dagster.yaml storage/dagster.yaml

run: install storage/dagster.yaml
	$(BIN)/python -m prism_assets run

# The SLURM tests need the local single-node cluster (2 fake GPUs, accounting by slurmdbd on MariaDB), the SSH tests Debian's
# openssh-server, the browser test Debian's chromium (driven by Playwright, which downloads no
# browser) and the team-deployment test Debian's PostgreSQL (a private cluster on 127.0.0.1:5433);
# as root all are installed and the cluster and PostgreSQL started, elsewhere install them yourself
# (make slurm-up, make postgres-up) or run `make test-fast`.
DEBIAN_TEST_PACKAGES := openssh-server chromium fonts-dejavu-core
test: lint storage/dagster.yaml
	@if [ "$$(id -u)" = 0 ]; then \
	  [ -x /usr/sbin/sshd ] && [ -x /usr/bin/chromium ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(DEBIAN_TEST_PACKAGES) >/dev/null); \
	  SLURM_CI_GPUS=2 SLURM_CI_SHARDS=2 scripts/slurm-dev-cluster.sh; \
	  scripts/postgres-dev.sh >/dev/null; fi
	PRISM_REQUIRE_SLURM=1 PRISM_REQUIRE_BROWSER=1 PRISM_REQUIRE_POSTGRES=1 $(BIN)/python -m pytest

test-fast: lint storage/dagster.yaml
	$(BIN)/python -m pytest -m 'not slow and not slurm'

# ruff (lint and format) and mypy, configured in pyproject.toml; `make test` runs them before the suite.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# After upgrading a dependency and seeing the tests pass: pin what is installed.
constraints: install
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.new
	mv constraints.new constraints.txt

slurm-up:
	SLURM_CI_GPUS=2 SLURM_CI_SHARDS=2 scripts/slurm-dev-cluster.sh

slurm-down:
	scripts/slurm-dev-cluster-stop.sh

# PostgreSQL for a team's Dagster instance, tried on this machine (README, "Operating it for a team").
postgres-up:
	scripts/postgres-dev.sh

postgres-down:
	scripts/postgres-dev-stop.sh

ui: install storage/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

benchmark: install
	$(BIN)/python benchmarks/pipeline_speed.py
