# Everything installs from nothing into .venv; every target depends on `setup`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the wheels this environment ships (the CPU/CUDA builds beside torchvision 0.29.1).
TORCH  := torch==2.14.1 torchvision==0.29.1
DEMO   ?= build/demo
PYTEST_FLAGS ?= -n 2

.PHONY: setup test test-slow lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_FLAGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check ip_adapter sg2img tests

demo: setup
	$(BIN)/sg2img demo --out $(DEMO)
	$(BIN)/sg2img generate --graph data/examples/sheep.json --prompt "a sheep on grass" --num-images 2 \
		--steps 20 --attention-maps --out $(DEMO)/generate

clean:
	rm -rf build .pytest_cache
