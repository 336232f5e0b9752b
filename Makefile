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

.PHONY: setup demo test test-all bench device-wheels
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bayesgen demo --out outputs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow" tests

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(VENV)/bin/bayesgen bench --out outputs/bench

# The packages a lent GPU machine lacks, as wheels for scripts/device-dgp.sh to carry (.whl/).
device-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_17_x86_64 -d .whl numpyro==0.22.0 \
	  blackjax==1.7.1 arviz==1.3.0 arviz-base==1.3.1 arviz-stats==1.3.3 arviz-plots==1.3.2 \
	  flowjax==19.1.2 paramax==0.0.5 flax==0.12.12
