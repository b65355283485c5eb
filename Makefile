# Entry points, each self-contained on a fresh machine with only Python >= 3.10:
#   make demo          venv + package, then the tour and a quick benchmark
#   make test          venv + package + test extras, then the whole test suite
#   make lint          ruff and mypy (the dev extra)
#   make wheel         build dist/leanloss-*.whl
#   make install-check the wheel with [bench] in a fresh venv; tour and a quick benchmark run
#                      from a temporary directory (nothing from the repository on the path)
#   make device-check  on a CUDA machine: the CUDA tests and the bf16 suite against its GPU
#                      peers, written to device_check.json (no network needed)
#   make test-compat TORCH=torch==2.5.1
#                      the whole suite against another torch, in its own venv (.venv-compat)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that this machine installs from a local file. The package itself
# needs torch>=2.13 (the lowest version the whole suite passes on); this pin is for dev and CI.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
COMPAT_VENV ?= .venv-compat
# pins that go with an older torch: transformers 5 needs torch >= 2.6 (empty it for a newer torch)
COMPAT_PINS ?= transformers<5
WHEEL_VENV  ?= .venv-wheel

.PHONY: demo test lint wheel install-check test-compat device-check bench tour clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench,transformers,trl,dev]"
	# peft: the TRL tests train a LoRA adapter too (the trl extra itself does not need it)
	$(BIN)/python -m pip install --quiet peft
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/leanloss tour
	$(BIN)/leanloss bench --quick

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests
	$(BIN)/mypy

wheel: $(VENV)/.test-installed
	rm -rf dist
	$(BIN)/python -m build --wheel --no-isolation --outdir dist .

install-check: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(WHEEL_VENV)/bin/python -m pip install --quiet "$$(ls dist/leanloss-*.whl)[bench]"
	cd "$$(mktemp -d)" && \
	  "$(CURDIR)/$(WHEEL_VENV)/bin/leanloss" --version && \
	  "$(CURDIR)/$(WHEEL_VENV)/bin/leanloss" tour > tour.txt && tail -n 1 tour.txt && \
	  "$(CURDIR)/$(WHEEL_VENV)/bin/leanloss" bench --quick --only linear_ce --out bench-results

$(COMPAT_VENV)/.installed-$(TORCH):
	rm -rf $(COMPAT_VENV)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet "$(TORCH)" $(if $(COMPAT_PINS),"$(COMPAT_PINS)")
	$(COMPAT_VENV)/bin/python -m pip install --quiet -e ".[test,bench,transformers]" $(if $(COMPAT_PINS),"$(COMPAT_PINS)")
	touch "$@"

test-compat: $(COMPAT_VENV)/.installed-$(TORCH)
	$(COMPAT_VENV)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -n 2 -q $(PYTEST_ARGS)

device-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m leanloss.cli.bench.device_check --out device_check.json

tour: $(VENV)/.demo-installed
	$(BIN)/leanloss tour

bench: $(VENV)/.demo-installed
	$(BIN)/leanloss bench

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(WHEEL_VENV) dist build bench-results
