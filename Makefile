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
	$(BIN)/sg2img evaluate shapes --graphs data/examples/shapes-world.json --num-images 4 --adapter none --out $(DEMO)/shapes-base
	$(BIN)/sg2img evaluate shapes --graphs data/examples/shapes-world.json --num-images 4 --out $(DEMO)/shapes
	$(BIN)/sg2img generate --graph data/examples/shapes.json --prompt "a red circle, a blue square and a green triangle" \
		--num-images 2 --steps 25 --guidance 5 --attention-maps --out $(DEMO)/generate

clean:
	rm -rf build .pytest_cache
