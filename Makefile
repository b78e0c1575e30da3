# One-word commands. Each creates .venv if missing and installs the project into it.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Real data for tests and the demo: $BLOODCELL_DATA if set, else ../shared/data when it exists. With neither, the demo
# downloads PBC (it says so) and the tests run on a synthetic sample drawn into .cache/sample_data by
# tools/make_sample.py (the published layouts, no real images; tests that need the real data skip with a reason).
BLOODCELL_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export BLOODCELL_DATA
SAMPLE_DATA := $(abspath .cache/sample_data)
TEST_DATA := $(or $(BLOODCELL_DATA),$(SAMPLE_DATA))
test data-check nbtest pytest: export BLOODCELL_DATA := $(TEST_DATA)
# torch above 2.14.1 must never be picked; the CUDA build also runs on CPUs.
TORCH_PIN := "torch>=2.1,<=2.14.1" "torchvision<=0.29.1"

.PHONY: model data-check venv browser demo test sync-check clean-check layers-check nbtest pytest docs-check export clean app bench

$(VENV)/.installed: settings.ini setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q $(TORCH_PIN) -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null 2>&1 || true
	touch $@

venv: $(VENV)/.installed

## make demo: the main job end to end (audit, split, presize, show a batch, train, evaluate)
demo: venv
	$(BIN)/bloodcell demo --out runs/demo

## make model: train the shipped model (bloodcell train's recipe, cli.PRETRAINED_RECIPE: the winner of benchmarks/TIME_TO_ACCURACY.md with the
## other-lab options of benchmarks/OTHERLAB.md, on the PBC half; its model card says how long it took) and write it to models/pbc_lite1
MODEL_RUN ?= runs/model_pbc_lite1
model: venv
	$(BIN)/bloodcell train --out $(MODEL_RUN) --dataset pbc --pretrained --seed 42 --num-workers 0
	$(PY) tools/ship_model.py $(MODEL_RUN) models/pbc_lite1 --make-command "make model"

## make test: library in sync with notebooks, notebooks clean, imports point down the layers, nbdev_test, pytest, docs
test: venv data-check browser sync-check clean-check layers-check nbtest pytest docs-check

## the tests and notebooks never download data: with no data folder they run on a drawn sample, and say so
data-check: venv
	@if [ "$(TEST_DATA)" = "$(SAMPLE_DATA)" ]; then \
	  test -f "$(SAMPLE_DATA)/SAMPLE.md" || $(PY) tools/make_sample.py "$(SAMPLE_DATA)" >/dev/null; \
	  echo "no data folder (BLOODCELL_DATA unset, no ../shared/data): using the synthetic sample in .cache/sample_data; tests that need the real data skip"; fi
	@test -d "$(BLOODCELL_DATA)/pbc" && test -d "$(BLOODCELL_DATA)/cnmc" && test -d "$(BLOODCELL_DATA)/allidb2" || \
	  { echo "FAIL: BLOODCELL_DATA='$(BLOODCELL_DATA)' must hold pbc/, cnmc/ and allidb2/ (unset it to test on the synthetic sample)"; exit 2; }

## Debian's chromium for the app's browser test (installed only when missing; never `playwright install`)
browser:
	sh tools/ensure_chromium.sh

sync-check: venv
	$(BIN)/nbdev_export
	@git diff --quiet -- bloodcell_fastai && test -z "$$(git status --porcelain -- bloodcell_fastai)" || \
	  { git status --short -- bloodcell_fastai; echo "FAIL: bloodcell_fastai/ is out of sync with nbs/: run nbdev_export and commit"; exit 1; }

clean-check: venv
	$(BIN)/nbdev_clean
	@git diff --quiet -- nbs || { git diff --stat -- nbs; echo "FAIL: notebooks are not clean: run nbdev_clean and commit"; exit 1; }

## every import in the library points down the layers (the notebook number is the layer)
layers-check: venv
	$(BIN)/python tools/check_layers.py

nbtest: venv data-check
	$(BIN)/nbdev_test --n_workers 1 --do_print --timing

pytest: venv data-check
	$(BIN)/python -m pytest -q tests

docs-check: venv
	$(BIN)/python tools/check_docs.py

export: venv
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

app: venv
	$(BIN)/bloodcell app --models $(or $(MODELS),models)

## make bench: the quick speed ratios of benchmarks/README.md (data loader against train step, our learner against a bare
## loop, batch predict against learn.predict; a few minutes). The accuracy benchmarks take hours: run them by the commands
## their pages give (TIME_TO_ACCURACY.md, OTHERLAB.md, ROBUST.md, INFERENCE.md).
bench: venv
	@test -d "$(BLOODCELL_DATA)/pbc" || { echo "make bench needs the PBC images: set BLOODCELL_DATA to a folder holding pbc/ (see README)"; exit 2; }
	$(PY) benchmarks/bench_data.py --n 1024 --size 128
	$(PY) benchmarks/bench_train.py --steps 8
	$(PY) benchmarks/predict.py --sizes 64,128
