# The single entry point: `make run` starts Hermes, `make test` runs every test.
# Every install step lives here, so both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export SAM_CLI_TELEMETRY := 0

.PHONY: install run test test-unit format lint build validate bench clean java

$(VENV)/.installed: pyproject.toml layers/hermes/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# DynamoDB Local needs Java 17; Debian's headless JRE when java is missing.
java:
	@command -v java >/dev/null || { echo "installing openjdk-17-jre-headless"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }

install: $(VENV)/.installed node_modules/.installed java

# Java is optional here: without it the runner embeds moto instead of DynamoDB Local.
run: $(VENV)/.installed node_modules/.installed
	$(PY) -m local.runner

test: install
	$(PY) -m pytest

test-unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

validate: $(VENV)/.installed
	$(VENV)/bin/sam validate --lint

build: $(VENV)/.installed
	$(VENV)/bin/sam build

bench: install
	$(PY) -m bench.run

clean:
	rm -rf .aws-sam .pytest_cache .mypy_cache .ruff_cache
