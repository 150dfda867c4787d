# Two commands for a newcomer: `make demo` and `make test`. Both run `make setup` first when needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export MMCV_WITH_OPS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint format clean bench bench-gpu image

# The cluster image (docker/Dockerfile); experiments/*.yaml name this tag. Push it where your cluster pulls.
IMAGE ?= ghcr.io/your-org/det-mmdet:0.1.0

setup: $(STAMP)

# torch and its torchvision first, then mmcv compiled against them with its C++ ops (docker/build-mmcv.sh:
# ~25 min on 2 cores, once: the wheel is kept in ~/.cache/det-mmdet/wheels), then everything else from
# the same pins, then this project (editable).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml docker/build-mmcv.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77,<81" wheel ninja
	$(BIN)/pip install -q "$$(grep '^torch==' requirements.txt)" "$$(grep '^torchvision==' requirements.txt)"
	bash docker/build-mmcv.sh $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(BIN)/det-mmdet demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/scaling.py

# The Runner-vs-det-mmdet comparison and the loader bench on one NVIDIA GPU (refuses to run without one).
bench-gpu: setup
	bash bench/gpu.sh

image:
	docker build -f docker/Dockerfile -t $(IMAGE) .

clean:
	rm -rf runs .pytest_cache
