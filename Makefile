# cogvx set-up and everyday commands. `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for the torch install, e.g. a wheel index for a given CUDA or CPU build
# (see README, "Installing on a GPU machine").
TORCH_PIP_ARGS ?=
PIP := $(BIN)/python -m pip
export PREFECT_HOME ?= $(CURDIR)/.prefect
export HF_HUB_DISABLE_TELEMETRY ?= 1
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: help install install-test run test lint clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first, pinned, so that nothing pulls the newest CUDA build as a dependency.
$(VENV)/.torch: | $(BIN)/python
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	@touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install -q -c constraints.txt -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[test]"
	@touch $@

install: $(VENV)/.installed  ## create .venv and install cogvx

install-test: $(VENV)/.installed-test  ## install cogvx with the test extras

run: install  ## run the main job on the embedded default (dvc repro of dvc.yaml)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The suite runs on PYTEST_WORKERS processes (pytest-xdist), each taking whole test files, so a
# file's fixtures (a trained run, a server) are built once: about 20 minutes on 2 cores.
PYTEST_WORKERS ?= 2

test: install-test  ## run the whole test suite
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:  ## remove the virtual environment and generated outputs
	rm -rf $(VENV) models outputs .pytest_cache
