# Two commands do all set-up on a fresh machine:
#   make demo   phantom -> preprocess -> train -> test, on CPU, end to end
#   make test   lint and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DATA ?= data/phantom
DEMO_RUN ?= runs/demo
DEMO_CASES ?= 15
DEMO_MODEL ?= R26-ViT-S_16
DEMO_EPOCHS ?= 15
DEMO_VOXELMORPH_ITERATIONS ?= 500

.PHONY: demo test install

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) make_phantom.py --out $(DEMO_DATA) --cases $(DEMO_CASES)
	$(PY) preprocess_data.py --raw_root $(DEMO_DATA) --workers 2 \
		--voxelmorph_iterations $(DEMO_VOXELMORPH_ITERATIONS)
	$(PY) train.py --dataset Myops --vit_name $(DEMO_MODEL) --root_path $(DEMO_DATA)/Processed_data \
		--max_epochs $(DEMO_EPOCHS) --batch_size 8 --output_dir $(DEMO_RUN)
	$(PY) test.py --run_dir $(DEMO_RUN) --root_path $(DEMO_DATA)/Processed_data
