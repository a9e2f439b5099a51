# The two commands of the README: `make run` (whole pipeline) and `make test` (all tests).
# Both create the virtualenv and install pinned dependencies first; `meterflow stack up` installs
# and starts the services (Debian packages, TimescaleDB build, Kafka jars) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit integration down status clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/meterflow run

test: $(STAMP) lint typecheck
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m unit

integration: $(STAMP)
	$(BIN)/pytest -m integration

down: $(STAMP)
	$(BIN)/meterflow stack down

status: $(STAMP)
	$(BIN)/meterflow stack status

clean: down
	rm -rf .stack
