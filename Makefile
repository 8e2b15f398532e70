# Two entry points on a fresh machine: `make demo` and `make test` (each builds .venv first).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
DEMO_OUT ?= runs/demo

.PHONY: venv demo test lint format clean browser

$(BIN)/corroprune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision first, as a matched pair that pip can take from local disk
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/corroprune

demo: venv
	$(BIN)/corroprune demo --out $(DEMO_OUT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two workers, a test file on one; the tests that start Ray share one (tests/conftest.py).
test: venv lint
	$(BIN)/pytest -n 2

# Debian's Chromium and its driver for the report's browser tests (they skip without them).
browser:
	apt-get update -qq && apt-get install -y -qq chromium chromium-driver

clean:
	rm -rf $(VENV) runs .pytest_cache
