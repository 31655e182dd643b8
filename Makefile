# vipoly: `make setup` (venv + deps), `make test` (whole suite), `make demo` (the main job).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS ?= constraints-cpu.txt
# Two pytest workers, a file each at a time (tests/conftest.py orders the files, heaviest first).
# The suite includes the lower-bound check (tests/test_lower_bounds.py runs scripts/check_bounds.py).
TEST_WORKERS ?= 2

.PHONY: setup test test-all demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[test,eval,publish,serve,mine]'
	bash scripts/install_fonts.sh
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions $(BIN)/python scripts/build_ops.py  # DeepSpeed's CPU op, once
	touch $(STAMP)

test: setup
	$(BIN)/lint-imports --no-cache  # the layers in pyproject.toml point one way
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-all: setup
	$(BIN)/python -m pytest -q -m '' -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: setup
	$(BIN)/python -m pipelines.demo

clean:
	rm -rf $(VENV) runs .pytest_cache .lowest
