# Two entry points, both self-contained on a fresh machine with only Python >= 3.10:
#   make demo   -> venv + package, then the tour and a quick benchmark
#   make test   -> venv + package + test extras, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that this machine installs from a local file. The package
# itself only needs torch>=2.4; this pin is for the dev/CI environment.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test bench tour clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench,transformers]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/leanloss tour
	$(BIN)/leanloss bench --quick

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

tour: $(VENV)/.demo-installed
	$(BIN)/leanloss tour

bench: $(VENV)/.demo-installed
	$(BIN)/leanloss bench

clean:
	rm -rf $(VENV) bench-results
