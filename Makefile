# MIHD platform. The two commands: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export MIHD_HOME    ?= $(CURDIR)/.mihd
export DAGSTER_HOME ?= $(MIHD_HOME)/dagster_home

.PHONY: demo test setup system-deps ui sql clean-demo

## Set everything up, write the demo data, materialize every asset on it.
demo: setup
	$(BIN)/mihd demo

## Set everything up and run the test suite (CI runs exactly this through .ci/run).
test: setup
	$(BIN)/python -m pytest

setup: system-deps $(STAMP) $(DAGSTER_HOME)/dagster.yaml

## R + mclust (clustering) and Chromium (UI tests) from Debian packages when apt is available.
system-deps:
	@bash scripts/install_system_deps.sh

# rpy2 is built against the R found at install time, so system-deps comes first.
$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=24"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: dagster_project/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp $< $@

## The Dagster UI on http://127.0.0.1:3000 (lineage, partitions, runs, checks).
ui: setup
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

## Example: make sql Q="SELECT * FROM slide_qc_latest"
sql: setup
	$(BIN)/mihd sql "$(Q)"

## Remove demo outputs (data, asset files, DuckDB, Dagster run history); keeps .venv.
clean-demo:
	rm -rf $(MIHD_HOME)
