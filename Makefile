# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv with Python 3.12 when it is missing (pyenv's 3.12, selected by
# .python-version, or any python3.12 on PATH).
PYTHON ?= $(shell command -v python3.12 2>/dev/null || echo python3.12)
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

.PHONY: setup demo test test-all bench
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bayesgen demo --out outputs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow" tests

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(VENV)/bin/bayesgen bench --out outputs/bench
