# Two commands on a fresh machine: `make demo` (the whole chain, then the search UI) and `make test`.
# Both create .venv with the pinned install on first use and reuse it afterwards.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline and quiet by default: no hub downloads, no analytics, no Ray token auth for local clusters.
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

PYTEST_FAST := -m "not slow and not browser and not gpu"

.PHONY: install demo test test-all test-slow test-browser lint bench clean help

help:
	@echo "make demo      synth -> preprocess -> train -> eval -> index -> serve (API + UI)"
	@echo "make test      the default test suite (fast + Ray tests)"
	@echo "make test-browser  the headless-Chromium UI test (needs Debian chromium + chromium-driver)"
	@echo "make test-all  everything, including slow and browser tests"
	@echo "make lint      ruff"
	@echo "make bench     benchmarks -> bench/results/*.json"

$(STAMP): pyproject.toml requirements/pins.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "tnlbt needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# One pip command with exact pins: torch and torchvision must come together (see README "Install").
	$(BIN)/pip install -r requirements/pins.txt -e ".[dev,edge]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tnlbt demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_FAST) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/pytest -m "slow and not browser and not gpu" $(PYTEST_ARGS)

test-browser: $(STAMP)
	$(BIN)/pytest -m browser $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/model.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/index.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf work .pytest_cache .ruff_cache
