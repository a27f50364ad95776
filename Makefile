# Two commands on a fresh machine with only Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= train,export,calibrate,dicom,nifti,eval,pacs,serve,triton,dev
DATA   ?= ../shared/data/ct-organs
DEMO_OUT ?= out/demo

.PHONY: install demo serve test lint bench model robust table1 windows study clean

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

## serve: annotate in the browser (http://127.0.0.1:8765/) on the shared CT volumes, or on pydicom's
## CT slice without them; INT8 model, exports to out/annotations/
serve: $(STAMP)
	@if [ -d "$(DATA)" ]; then d="$(DATA)"; else \
	  d="$$($(BIN)/python -c 'from pydicom.data import get_testdata_file; print(get_testdata_file("CT_small.dcm"))')"; fi; \
	$(BIN)/cmdeploy serve --data "$$d" --model cmdeploy/models/cmdeploy-default.int8.onnx --output out/annotations

## test: lint, then the test suite (slow tests excluded; data tests skip without ../shared)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not slow" -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

## bench: every benchmark in docs/results.md, on the shipped models (the data ones need ../shared)
M := cmdeploy/models/cmdeploy-default
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_guidance.py
	$(BIN)/python benchmarks/bench_int8.py --fp32 $(M).onnx --int8 $(M).int8.onnx --batches 1 16
	$(BIN)/cmdeploy bench --model $(M).onnx --model $(M).int8.onnx --model $(M).fused.onnx
	$(BIN)/python benchmarks/bench_infer.py --model $(M).onnx --model $(M).int8.onnx --data $(DATA)
	$(BIN)/python benchmarks/bench_triton.py --model $(M).int8.onnx --model $(M).onnx
	$(BIN)/python benchmarks/bench_export.py --checkpoint $(M).pt --onnx $(M).onnx

## model: retrain the shipped default from ../shared/data (not part of CI; about 75 min on 2 cores).
## 1) the recipe (EP guidance, simulated annotator clicks), validated on held-out patients (the
## thorax patient, 5 tumour patients); 2) the same recipe on every patient (shipped); 3) its
## weights-only checkpoint (what `train --init` starts from); 4) plain + fused ONNX (float32
## geometry: TensorRT has no FP64); 5) INT8 for CPU, gated on Dice of thorax objects; 6) the
## TensorRT-compatibility lint of the plain and fused models.
TUMOURS  ?= ../shared/data/ct-tumours
HELD_OUT  = thorax_1p5mm,sts_003,sts_008,sts_013,sts_018,sts_023
RECIPE = --data $(DATA) --data $(TUMOURS) --config compact --epochs 8 --samples-per-epoch 1536 --batch-size 8 \
         --lr 1e-3 --seed 0 --clicks annotator --threads 2 --no-progress --overwrite
MODELS = cmdeploy/models
model: $(STAMP)
	$(BIN)/cmdeploy train $(RECIPE) --guidance ep --val-cases $(HELD_OUT) --val-every 4 --out runs/table1_ep
	$(BIN)/cmdeploy train $(RECIPE) --guidance ep --no-validation --recipe-checkpoint runs/table1_ep/last.pt \
		--out runs/default_all
	$(BIN)/python -m cmdeploy.train.checkpoint --weights-only runs/default_all/best.pt $(MODELS)/cmdeploy-default.pt \
		--overwrite
	$(BIN)/cmdeploy export --checkpoint $(MODELS)/cmdeploy-default.pt --overwrite --output $(MODELS)/cmdeploy-default.onnx
	$(BIN)/cmdeploy export --checkpoint $(MODELS)/cmdeploy-default.pt --fused --fused-geometry float32 \
		--overwrite --output $(MODELS)/cmdeploy-default.fused.onnx
	$(BIN)/cmdeploy calibrate --model $(MODELS)/cmdeploy-default.onnx --data $(DATA) --target cpu \
		--overwrite --output $(MODELS)/cmdeploy-default.int8.onnx
	$(BIN)/cmdeploy verify --target tensorrt $(MODELS)/cmdeploy-default.onnx
	$(BIN)/cmdeploy verify --target tensorrt $(MODELS)/cmdeploy-default.fused.onnx

## robust: issue 12's robust recipe (measured, not shipped: docs/model-card.md says why). ct-organs
## (abdomen) + 20 ct-tumours patients, simulated annotator clicks and spacing resampling, 8 epochs
## from scratch then 10 fine-tuned (--init); held out: the thorax patient and 5 tumour patients.
ROBUST    = --data $(DATA) --data $(TUMOURS) --config compact --samples-per-epoch 1792 --batch-size 8 \
            --clicks annotator --val-cases $(HELD_OUT) --threads 2 --no-progress --overwrite
robust: $(STAMP)
	$(BIN)/cmdeploy train $(ROBUST) --guidance cm --epochs 8 --lr 1e-3 --seed 0 --val-every 8 --out runs/robust_cm
	$(BIN)/cmdeploy train $(ROBUST) --init runs/robust_cm/best.pt --epochs 10 --lr 5e-4 --seed 1 --val-every 2 \
		--out runs/robust_cm_ft
	$(BIN)/cmdeploy export --checkpoint runs/robust_cm_ft/last.pt --overwrite --output runs/robust_cm_ft/model.onnx
	for c in exact annotator; do \
	  $(BIN)/cmdeploy evaluate -m $(MODELS)/cmdeploy-default.onnx -m runs/robust_cm_ft/model.onnx --data $(DATA) \
	    --cases thorax_1p5mm --clicks $$c && \
	  $(BIN)/cmdeploy evaluate -m $(MODELS)/cmdeploy-default.onnx -m runs/robust_cm_ft/model.onnx --data $(TUMOURS) \
	    --cases sts_003,sts_008,sts_013,sts_018,sts_023 --clicks $$c || exit 1; \
	done

## table1: issue 12's equal-budget Table 1: CM vs EP vs CM+EP with one identical recipe (ct-organs
## abdomen + 20 ct-tumours patients, simulated annotator clicks, 8 x 1536 samples, about 35 min each
## here), evaluated on the held-out thorax patient and 5 held-out tumour patients with exact and
## annotator clicks, next to the shipped default (which saw the thorax patient in training).
TABLE1 = $(RECIPE) --val-cases $(HELD_OUT) --val-every 4
table1: $(STAMP)
	for g in cm ep cm+ep; do \
	  $(BIN)/cmdeploy train $(TABLE1) --guidance $$g --out runs/table1_$$g && \
	  $(BIN)/cmdeploy export --checkpoint runs/table1_$$g/last.pt --overwrite --output runs/table1_$$g/model.onnx \
	  || exit 1; \
	done
	for c in exact annotator; do \
	  $(BIN)/cmdeploy evaluate -m $(MODELS)/cmdeploy-default.onnx -m runs/table1_cm/model.onnx \
	    -m runs/table1_ep/model.onnx -m runs/table1_cm+ep/model.onnx --data $(DATA) --cases thorax_1p5mm \
	    --clicks $$c --output runs/table1_thorax_$$c --overwrite && \
	  $(BIN)/cmdeploy evaluate -m $(MODELS)/cmdeploy-default.onnx -m runs/table1_cm/model.onnx \
	    -m runs/table1_ep/model.onnx -m runs/table1_cm+ep/model.onnx --data $(TUMOURS) \
	    --cases sts_003,sts_008,sts_013,sts_018,sts_023 --clicks $$c --output runs/table1_tumours_$$c \
	    --overwrite || exit 1; \
	done

## windows: issue 12's image-channel question: the shipped recipe (EP, table1 split) with a lung and a
## bone window as two more image channels next to the paper's soft-tissue one (about 30 min here),
## evaluated on the held-out patients like table1's EP column (measured, not shipped: model card).
windows: $(STAMP)
	$(BIN)/cmdeploy train $(TABLE1) --guidance ep --extra-windows=-1000:0,150:1500 --out runs/table1_ep_windows
	$(BIN)/cmdeploy export --checkpoint runs/table1_ep_windows/last.pt --overwrite \
		--output runs/table1_ep_windows/model.onnx
	for c in exact annotator; do \
	  $(BIN)/cmdeploy evaluate -m runs/table1_ep_windows/model.onnx --data $(DATA) --cases thorax_1p5mm \
	    --clicks $$c --output runs/windows_thorax_$$c --overwrite && \
	  $(BIN)/cmdeploy evaluate -m runs/table1_ep_windows/model.onnx --data $(TUMOURS) \
	    --cases sts_003,sts_008,sts_013,sts_018,sts_023 --clicks $$c --output runs/windows_tumours_$$c \
	    --overwrite || exit 1; \
	done

## study: issue 17's workflow at reduced scale (about 30-40 min on 2 cores; not part of CI): base model
## on ct-organs only, fine-tune on 6 ct-tumours patients, generate labels from simulated clicks for 16,
## U-Net on ground truth vs generated labels tested on 3; the split is fixed in the script. Writes
## runs/study/ (results.md, results.json, stages/*.json with each stage's command and wall time);
## a finished stage is skipped when it is run again.
study: $(STAMP)
	$(BIN)/python scripts/study_tumours.py

clean:
	rm -rf $(VENV) out build *.egg-info
