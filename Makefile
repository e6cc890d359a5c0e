# The README's two commands: `make demo` (main job) and `make test` (whole suite).
# Both create .venv from the pinned constraints when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), "muon_ds CI needs Python >= 3.12 (megatron-core); see .python-version"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,demo,deepspeed,megatron]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m ruff check muon_ds tests benchmarks launch
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check muon_ds tests benchmarks launch
	$(PY) -m ruff format --check muon_ds tests benchmarks launch
