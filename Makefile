# anomalens — two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision are pinned here only to pick the wheels this workplace keeps on disk;
# pyproject.toml declares the supported ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-fast lint typecheck format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,serve]"
	touch $(STAMP)

venv: $(STAMP)

# the team's TF-converted MobileNetV2, used by the demo when it is there (random features otherwise)
DEMO_WEIGHTS ?= ../shared/weights/mobilenet_v2_imagenet_int8dequant.safetensors

demo: $(STAMP)
	$(VENV)/bin/anomalens demo --out demo_out $(if $(wildcard $(DEMO_WEIGHTS)),--weights $(DEMO_WEIGHTS) --backbone mobilenet_v2_tf)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q

# unit and service tests only (no tests/integration): a quick check while editing
test-fast: lint typecheck
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
