# Two entry points (see README): `make bench` and `make test`.  Both create .venv on first use.
# `make bench` writes its JSON and PNG to ./contrastgen-bench/; `make test` includes the packaging tests
# (marked slow: they build an sdist and a wheel with build isolation, which fetches setuptools and pybind11).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.contrastgen-installed
TEST_ENV := TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1

.PHONY: install bench test clean

$(STAMP): requirements/cpu.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/contrastgen bench --quick

test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 -q tests

clean:
	rm -rf build dist *.egg-info contrastgen/_cpp_*.so contrastgen/_build_info.json contrastgen/_build_logs
