# Two commands do everything: `make demo` (the main job) and `make test` (the tests).
# Both create .venv at the repo root and install the locked versions first.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Two pytest workers, each taking whole modules (module fixtures such as a served model start
# once): much of the suite waits on real servers, Kafka and subprocesses, so two workers on two
# cores overlap those waits. Each worker starts its own isolated stack. XDIST= runs serially.
# Modules are handed out in collection order, where tests/conftest.py puts the longest first
# (xdist's default reorder sorts by the number of tests, which put the long ML-100K module last).
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install demo test test-slow down up status bench clean help

help:
	@echo "make demo    - install, start the local stack, run the main job on synthetic data"
	@echo "make test    - install, run the test suite (starts its own isolated stack)"
	@echo "make test-slow - the two-stage ML-100K evaluation alone (also part of make test)"
	@echo "make down    - stop the local stack started by 'make demo'"
	@echo "make status  - show the local stack"
	@echo "make bench   - run every benchmark after make demo (writes benchmarks/results/)"

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { echo "error: $(PYTHON) is not Python 3.11: run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/recsys demo

# the layer contracts first (pyproject.toml, [tool.importlinter]): a back-arrow fails fast, named;
# pytest exits 5 when it collects nothing: that is not a failure of the code under test
test: install
	$(BIN)/lint-imports --no-logo
	@$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# the long quality check alone: the two-stage ML-100K evaluation (make test runs it too)
test-slow: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/models/test_ranker.py -k two_stage

down:
	@if [ -x $(BIN)/recsys ]; then $(BIN)/recsys stack down; else echo "nothing to stop (.venv missing)"; fi

up: install
	$(BIN)/recsys stack up

status: install
	$(BIN)/recsys stack status

# run after `make demo` (the serving benchmark needs the service up)
bench: install
	$(BIN)/python -m benchmarks.generator
	$(BIN)/python -m benchmarks.feature_store
	$(BIN)/python -m benchmarks.stream
	$(BIN)/python -m benchmarks.training
	$(BIN)/python -m benchmarks.quality
	$(BIN)/python -m benchmarks.serving
	$(BIN)/python -m benchmarks.loop

clean: down
	rm -rf data run
