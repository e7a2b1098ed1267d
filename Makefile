# Two entry points (see README): `make bench` and `make test`.  Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.contrastgen-installed
TEST_ENV := TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1

.PHONY: install bench test clean

$(STAMP): requirements/cpu.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
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
	rm -rf build *.egg-info contrastgen/_cpp_*.so
