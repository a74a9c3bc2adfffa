# Two entry points for newcomers: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean gpu-check

setup: $(STAMP)

# torch first and pinned (a CPU wheel here; no CUDA packages pulled), then DeepSpeed without build
# isolation (its build imports torch), then this project with its test and bench extras (the bench
# smoke tests run datasketch).
# DeepSpeed's CPU ops are compiled at install, as DeepSpeed advises for installs (DS_BUILD_*): else the
# first run that needs one compiles it just in time, every rank waiting on a lock (ZeRO-Offload's cpu_adam
# ~100 s, the shared-memory comm op every ZeRO start loads ~30 s, on 2 cores). --no-cache-dir: a wheel
# cached from a build without them would be reused. Without a working compiler, the plain install.
DS_PREBUILD := DS_ACCELERATOR=cpu DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 DS_ENABLE_NINJA=1
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 ninja
	$(DS_PREBUILD) $(PY) -m pip install --quiet --no-build-isolation --no-cache-dir deepspeed \
	  || $(PY) -m pip install --quiet --no-build-isolation deepspeed
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/slimpajama-demo

# Two pytest workers on two cores: half a test's time is process start-up, rendezvous and waiting
# (SLURM's scheduler, requeues), which the other worker fills. With loadgroup, tests/conftest.py's
# scheduler sends every test to whichever worker is free, the SLURM modules together to one.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

test: setup
	$(PY) -m pytest -q $(XDIST)

# Every test not marked slow; fails if it leaves a module of slimpajama_train/ or data_prep/ untouched
# (imported by no test process nor any process a test started).
test-fast: setup
	SLIMPAJAMA_TOUCH_CHECK=1 $(PY) -m pytest -q $(XDIST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# On a GPU host: the GPU tests and benchmarks, one JSON line at the end (benchmarks/gpu_check.py).
# Not after setup (which would install a CPU torch): the .venv's python if there is one, else $(PYTHON)
# with the host's own torch. Options: make gpu-check GPU_CHECK_ARGS="--out gpu_check.json --skip-mfu"
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf data runs outputs
