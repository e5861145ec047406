# Two entry points for a fresh machine; each creates (or reuses) the local virtual environment.
#   make repro  - run the whole DVC pipeline (default: the embedded synthetic benchmark, offline)
#   make repro PRESET=coco_pfenet_svf - params.yaml written from presets/<name>.yaml first (stages/preset.py)
#   make rehearse PRESET=coco_pfenet_svf - the preset's whole chain on a miniature of its benchmark, in a copy
#       of the project (rehearsal/<name>), before the GPU run (stages/rehearse.py)
#   make repro PRESET=pascal_pfenet_frozen RELEASED='initmodel/PFENet/fold{fold}.pth' - a published model
#       adopted instead of training (docs/released.md), then evaluated, merged, exported and reported
#   make test   - run the test suite on every core (pytest-xdist)
#   make test-fast - the unit tier: no DVC, no server, no C++ build, no training (tests/conftest.py)
#   make ablation - the default pipeline, then frozen / svf / full trained and scored alike (results/ablation)
#   make serve  - start the inference service on the model the default pipeline exported
#   make cpp    - build the C++ library and svf_fss_predict (cpp/, into build/cpp) against the torch wheel's LibTorch,
#                 then the AOTInductor package it loads (export.aoti: true, `dvc exp run`: the export stages rerun)
#   make lock   - re-resolve requirements.lock after editing pyproject.toml or constraints.txt
# The environment is installed from requirements.lock: every package pinned, every file's sha256 checked.
PYTHON ?= python3
VENV   ?= .venv
TRT_STUBS := tensorrt-stubs==10.13.0.35.1
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Label Studio for the ML backend's round-trip test, in an environment of its own (its pins clash with ours:
# numpy < 2.3), with a database initialised once (48 s) that each test copies (then it starts in 5 s); initialised
# as a team's would be, with Label Studio's defaults (legacy API tokens off: the test uses a personal access token)
LS_VENV  ?= .venv-labelstudio
# (-2: the database initialised with Label Studio's defaults; a stamp of another name rebuilds it)
LS_STAMP := $(LS_VENV)/.installed-2

.PHONY: rehearse repro test test-fast ablation serve cpp venv bench lock clean-venv

venv: $(STAMP)

$(STAMP): requirements.lock requirements-stubs.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --require-hashes --no-deps --upgrade --target $(VENV)/typings -r requirements-stubs.lock
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(LS_STAMP): requirements-labelstudio.lock
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --require-hashes --no-deps -q -r requirements-labelstudio.lock
	rm -rf $(LS_VENV)/template && mkdir -p $(LS_VENV)/template
	LABEL_STUDIO_BASE_DATA_DIR=$(CURDIR)/$(LS_VENV)/template DJANGO_DB=sqlite SENTRY_DSN= FRONTEND_SENTRY_DSN= \
	  COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false $(LS_VENV)/bin/label-studio init \
	  --username tests@svf-fss.local --password svf-fss-tests > $(LS_VENV)/init.log 2>&1 \
	  || { tail -20 $(LS_VENV)/init.log; exit 1; }
	touch $(LS_STAMP)

repro: $(STAMP)
ifdef PRESET
	$(BIN)/python -m stages.preset $(PRESET) $(if $(RELEASED),--released '$(RELEASED)') \
	  $(if $(RELEASED_FORMAT),--released-format $(RELEASED_FORMAT))
endif
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

rehearse: $(STAMP)
	$(BIN)/python -m stages.rehearse $(PRESET)

ablation: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m stages.ablation $(ABLATION_ARGS)

test: $(STAMP) $(LS_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n auto --dist loadgroup --durations=15

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n auto --dist loadgroup -m "not slow"

serve: $(STAMP)
	$(BIN)/python -m serving --model-dir models/fold0/1shot

cpp: $(STAMP)
	$(BIN)/cmake -S cpp -B build/cpp -DPython3_EXECUTABLE=$(CURDIR)/$(BIN)/python
	$(BIN)/cmake --build build/cpp -j2
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run -S export.aoti=true

bench: $(STAMP)
	$(BIN)/python benchmarks/svf_forms.py

lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra openvino -c constraints.txt --generate-hashes --universal \
		--python-version 3.10 -o requirements.lock
	echo "$(TRT_STUBS)" | $(BIN)/uv pip compile - --no-deps --generate-hashes --universal --python-version 3.10 \
		-o requirements-stubs.lock
	echo "label-studio==1.23.2" | $(BIN)/uv pip compile - --generate-hashes --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu -o requirements-labelstudio.lock

clean-venv:
	rm -rf $(VENV)
