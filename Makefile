# Two entry points on a fresh machine: `make test` and `make demo`. Each sets up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.svdq-installed

.PHONY: test test-scale test-all demo lint clean kernels-asan gpu-check gpu-check-emulate gpu-wheels

# torch goes in first and pinned: `pip install torch==2.13.0` takes the CPU build on this disk;
# letting the project's bare `torch` requirement resolve first would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Tests run on every core (pytest-xdist: session fixtures are built once per worker; JOBS=1 for one process).
# `make test` is the everyday suite; the real-size cases (marker `scale`) run with `make test-scale`;
# `make test-all` is both, as CI runs them.
PYTEST := $(PY) -m pytest -q -n $(or $(JOBS),auto)
test: $(STAMP)
	$(PYTEST) -m "not scale"

test-scale: $(STAMP)
	$(PYTEST) -m scale

test-all: test test-scale

demo: $(STAMP)
	$(VENV)/bin/svdq quantize tiny-flux --out runs/demo

# Everything only a GPU can show, as one JSON report (benchmarks/gpu_check.py). It runs on a GPU machine's
# own python3 (its CUDA torch and CuPy) with this tree on the path and the wheels of .whl/ (made here by
# `make gpu-wheels`), not in .venv: a lent GPU machine is bare and offline. `make gpu-check-emulate` runs
# the same script on the CPU emulator at small shapes, as CI does. Extra flags: ARGS="--parts kernels".
GPU_PYTHON ?= python3
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)

gpu-check-emulate: $(STAMP)
	$(PY) benchmarks/gpu_check.py --emulate --out gpu-check-emulated.json $(ARGS)

gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_check.py --fetch-wheels

# The kernel tests with the emulator built under AddressSanitizer and UBSan (ucontext fibers, which ASan
# understands); not in CI. Checked builds use -fsanitize=thread hooks, which cannot combine with ASan: skipped.
ASAN_LIBS = $(shell g++ -print-file-name=libasan.so) $(shell g++ -print-file-name=libubsan.so)
kernels-asan: $(STAMP)
	SVDQ_CACHE_DIR=$(CURDIR)/.cache-asan \
	SVDQ_EMU_CXXFLAGS="-DSVDQ_EMU_UCONTEXT -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1" \
	ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0 LD_PRELOAD="$(ASAN_LIBS)" \
	$(PY) -m pytest -q -p no:cacheprovider tests/runtime/test_emulator.py tests/runtime/test_emulated_kernels.py -k "not checked"

lint: $(STAMP)
	$(PY) -m ruff check svdq_cli tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .cache-asan
