# Two entry points for newcomers: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch first and pinned (a CPU wheel here; no CUDA packages pulled), then DeepSpeed without build
# isolation (its build imports torch), then this project with its test and bench extras (the bench
# smoke tests run datasketch).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-build-isolation deepspeed
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/slimpajama-demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf data runs outputs
