# Two commands do all the set-up: `make train` and `make test` (each installs what it needs first).
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/default
ARGS ?=

.PHONY: install train test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test,tpu]"
	touch $@

# What only the tests need, installed by `make test` (so `make train` stays light): the Wan2.1
# parity tests compare with diffusers in PyTorch (CPU), the `vdit prepare` tests run Apache Beam,
# PySceneDetect and tiny transformers models.
$(VENV)/.test-extras: pyproject.toml $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e ".[parity,data]"
	touch $@

# Train the embedded default (tiny DiT, procedural captioned videos, CPU) into $(WORKDIR).
train: install
	JAX_PLATFORMS=cpu $(VENV)/bin/vdit train --config=configs/default.py --workdir=$(WORKDIR) $(ARGS)

# The test suite. Eight fake CPU devices are set up by tests/conftest.py. Tests marked `slow` are
# left out by default; `make test MARK=slow` runs just those, `make test MARK=` runs everything.
MARK ?= not slow
test: install $(VENV)/.test-extras
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest -q -m "$(MARK)" $(ARGS)

lint: install
	$(VENV)/bin/ruff check vdit tests bench configs launch
	$(VENV)/bin/ruff format --check vdit tests bench configs launch
