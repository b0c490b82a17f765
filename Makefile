# make demo / make test work on a fresh machine with Python 3.11 and make: they create .venv,
# install the project into it, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo: generated shards (built once into data/demo), then the demo preset end to end on an
# embedded local Ray; each `make demo` starts a fresh run in runs/demo.
DEMO_DATA := data/demo
DEMO_RUN := runs/demo

demo: $(STAMP)
	test -f $(DEMO_DATA)/dataset.json || $(BIN)/alexnet shards --synthetic 3000 $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(BIN)/alexnet train --preset demo --data $(DEMO_DATA) --run-dir $(DEMO_RUN)

# Two workers: the tests with a Ray in one, in order, the others beside them (tests/streams.py).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Each benchmark prints a ratio against a baseline measured in the same run (bench/RESULTS.md).
bench: $(STAMP)
	$(BIN)/python bench/model.py
	$(BIN)/python bench/pipeline.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/data.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/runtime.py

# Everything about the engine that needs a GPU (bench/gpu_check.py): one JSON line, < 8 min on
# one H100/H200. It runs on the GPU machine as it comes: its own python3 with torch and
# torchvision, no install step, no Ray, no webdataset, no network (GPU_PYTHON picks another).
# `bench/gpu_check.py --device cpu` runs the same sections on CPU (a test does, without Ray).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info
