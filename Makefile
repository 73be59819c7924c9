# cairn's two everyday commands (see README): `make demo` and `make test`. Each installs what it needs.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := src tests examples bench fuzz

.PHONY: demo test lint typecheck pytest bench soak clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python bench/bench_store.py --json bench/results/store.json && $(BIN)/python bench/bench_training.py --json bench/results/training.json

# the reliability suite at soak size (thousands of trials, an hour of fuzzing: see docs/reliability.md)
soak: $(STAMP)
	rm -f soak-report.jsonl
	CAIRN_SOAK=1 HYPOTHESIS_PROFILE=thorough CAIRN_RELIABILITY_REPORT=$(CURDIR)/soak-report.jsonl \
		$(BIN)/pytest -n 2 -q -p no:cacheprovider tests/reliability
	$(BIN)/python tests/reliability/report.py soak-report.jsonl

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis demo-out soak-report.jsonl
