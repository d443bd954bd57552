# Two entry points on a fresh machine: `make test` and `make demo`. Each sets up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.svdq-installed

.PHONY: test demo lint clean

# torch goes in first and pinned: `pip install torch==2.13.0` takes the CPU build on this disk;
# letting the project's bare `torch` requirement resolve first would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/svdq quantize tiny-flux --out runs/demo

lint: $(STAMP)
	$(PY) -m ruff check svdq_cli tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
