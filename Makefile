# Two entry points for a fresh machine; each creates (or reuses) the local virtual environment.
#   make repro  - run the whole DVC pipeline (default: the embedded synthetic benchmark, offline)
#   make test   - run the test suite
#   make serve  - start the inference service on the model the default pipeline exported
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: repro test serve venv bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

serve: $(STAMP)
	$(BIN)/python -m serving --model-dir models/fold0

bench: $(STAMP)
	$(BIN)/python benchmarks/svf_forms.py

clean-venv:
	rm -rf $(VENV)
