# Two commands on a fresh machine with only Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= train,export,dicom,nifti,dev
DATA   ?= ../shared/data/ct-organs
DEMO_OUT ?= out/demo

.PHONY: install demo test lint bench model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

## demo: segment the aorta and a vertebral body on pydicom's bundled CT slice with the shipped model
demo: $(STAMP)
	$(BIN)/cmdeploy infer \
		--input "$$($(BIN)/python -c 'from pydicom.data import get_testdata_file; print(get_testdata_file("CT_small.dcm"))')" \
		--points examples/ct_small_points.csv \
		--output $(DEMO_OUT) --overwrite
	@echo "demo outputs in $(DEMO_OUT)/"

## test: lint, then the test suite (slow tests excluded; data tests skip without ../shared)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not slow" -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_guidance.py

## model: retrain the shipped default from ../shared/data (not part of CI; ~45 min on 2 cores)
model: $(STAMP)
	$(BIN)/python scripts/make_model.py --data $(DATA)

clean:
	rm -rf $(VENV) out build *.egg-info
