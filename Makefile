# Entry points, each self-contained on a fresh machine with only Python >= 3.10:
#   make demo          venv + package, then the tour and a quick benchmark
#   make test          venv + package + test extras, then the whole test suite
#   make lint          ruff and mypy (the dev extra)
#   make docs          the documentation site (mkdocs, the docs extra) built into site/ with
#                      warnings as errors; .venv/bin/mkdocs serve previews it
#   make wheel         build dist/leanloss-*.whl
#   make install-check the wheel with [bench] in a fresh venv; tour and a quick benchmark run
#                      from a temporary directory (nothing from the repository on the path)
#   make device-check  on a CUDA machine: the CUDA tests and the bf16 suite against its GPU
#                      peers, written to device_check.json (no network needed)
#   make test-compat TORCH=torch==2.6.0
#                      the whole suite against another torch, in its own venv (.venv-compat);
#                      fails unless the torch it ran on is the one requested
#   make test-torch-range
#                      test-compat at both ends of the supported range (TORCH_LOWEST, TORCH_NEWEST);
#                      make torch-range-venvs builds their venvs only; test-torch-lowest and
#                      test-torch-newest (torch-lowest-venv, torch-newest-venv) take one end
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that this machine installs from a local file. The package itself
# needs the lowest torch the whole suite passes on (pyproject.toml); this pin is for dev and CI.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
COMPAT_VENV ?= .venv-compat
# Pins that go with the requested torch, space-separated requirement specifiers. Like TORCH they
# are pip constraints of every install into the compat venv, so nothing upgrades that torch.
# transformers 5 needs torch >= 2.6.
COMPAT_PINS ?=
# The ends of the supported torch range that CI tests (test-torch-range): the lowest torch the
# whole suite passes on, read off pyproject.toml's "torch>=X.Y" (torch==X.Y is X.Y.0), with the
# transformers of its time, and the newest torch the registry serves with the newest transformers.
TORCH_FLOOR   := $(shell sed -n 's/^dependencies = \["torch>=\([0-9.]*\)"\]$$/\1/p' pyproject.toml)
TORCH_LOWEST  ?= torch==$(TORCH_FLOOR)
PINS_LOWEST   ?= transformers<5
TORCH_NEWEST  ?= torch==2.14.1
PINS_NEWEST   ?=
WHEEL_VENV  ?= .venv-wheel

.PHONY: demo test lint docs wheel install-check compat-venv test-compat torch-lowest-venv torch-newest-venv test-torch-lowest test-torch-newest torch-range-venvs test-torch-range device-check bench tour clean

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

# the API reference imports every public module, transformers' integration included
$(VENV)/.docs-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[docs,transformers,trl]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/leanloss tour
	$(BIN)/leanloss bench --quick

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests docs/_ext
	$(BIN)/mypy --show-traceback

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

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

# what the compat venv was built for (the requested torch, the pins and pyproject.toml's digest);
# a change rebuilds it
COMPAT_CONSTRAINTS = printf '%s\n' "\# pyproject.toml $$(sha1sum pyproject.toml | cut -c1-16)" \
	"$(TORCH)" $(foreach pin,$(COMPAT_PINS),"$(pin)")

# the compat venv alone, built unless it was built for the same constraints
compat-venv:
	@if ! $(COMPAT_CONSTRAINTS) | cmp -s - "$(COMPAT_VENV)/constraints.txt"; then \
	  set -ex; rm -rf "$(COMPAT_VENV)"; $(PYTHON) -m venv "$(COMPAT_VENV)"; \
	  $(COMPAT_CONSTRAINTS) > "$(COMPAT_VENV)/constraints.in"; \
	  "$(COMPAT_VENV)/bin/python" -m pip install --quiet -c "$(COMPAT_VENV)/constraints.in" \
	    "$(TORCH)" -e ".[test,bench,transformers]"; \
	  mv "$(COMPAT_VENV)/constraints.in" "$(COMPAT_VENV)/constraints.txt"; \
	fi

test-compat: compat-venv
	"$(COMPAT_VENV)/bin/python" -c "$$TORCH_IS_REQUESTED" "$(TORCH)"
	"$(COMPAT_VENV)/bin/python" -m pytest -n 2 -q $(PYTEST_ARGS)

# make variables that put compat-venv / test-compat at one end of the range (lowest, newest), in
# that end's own venv
RANGE_CHECK = $(if $(TORCH_FLOOR),,$(error pyproject.toml's dependencies do not read ["torch>=X.Y"]))
RANGE_VARS_lowest = TORCH="$(TORCH_LOWEST)" COMPAT_PINS="$(PINS_LOWEST)" COMPAT_VENV=.venv-compat-lowest
RANGE_VARS_newest = TORCH="$(TORCH_NEWEST)" COMPAT_PINS="$(PINS_NEWEST)" COMPAT_VENV=.venv-compat-newest

# one end's venv, or the suite in it (CI runs the ends one after the other and deletes each venv
# after its run: each is a CUDA build of about 6 GB, and two at once have filled a CI disk)
torch-lowest-venv torch-newest-venv: torch-%-venv:
	$(RANGE_CHECK)
	$(MAKE) compat-venv $(RANGE_VARS_$*)

test-torch-lowest test-torch-newest: test-torch-%:
	$(RANGE_CHECK)
	$(MAKE) test-compat $(RANGE_VARS_$*)

# both ends: their venvs only, or the suite in each, lowest first
torch-range-venvs: torch-lowest-venv torch-newest-venv

test-torch-range: test-torch-lowest test-torch-newest

# prints the torch (and transformers) of the venv; exits non-zero unless torch meets argv[1]
define TORCH_IS_REQUESTED
import sys, torch, transformers
from packaging.requirements import Requirement
wanted = Requirement(sys.argv[1])
print(f"torch {torch.__version__}, transformers {transformers.__version__} (requested {wanted})")
if not wanted.specifier.contains(torch.__version__, prereleases=True):
    sys.exit(f"test-compat: the venv has torch {torch.__version__}, not the requested {wanted}")
endef
export TORCH_IS_REQUESTED

device-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m leanloss.cli.bench.device_check --out device_check.json

tour: $(VENV)/.demo-installed
	$(BIN)/leanloss tour

bench: $(VENV)/.demo-installed
	$(BIN)/leanloss bench

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .venv-compat-lowest .venv-compat-newest $(WHEEL_VENV) dist build bench-results site
