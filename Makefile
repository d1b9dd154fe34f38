# meshserve — `make up` runs the mesh locally, `make test` runs the checks.
# Both create .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch goes in first and pinned: this machine kind ships a CPU wheel of 2.13.0,
# and a bare "torch" from the index would be a multi-GB CUDA build. Override
# on other machines, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
# -qq: this machine kind's pip config names local indexes that warn on every package.
PIP_FLAGS  ?= -qq --disable-pip-version-check

.PHONY: up test lint typecheck pytest protos bench bench-perf bench-floor clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) $(TORCH_SPEC)
	$(PY) -m pip install $(PIP_FLAGS) -e ".[dev,triton,datasets]"
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/meshserve up

test: lint typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest

protos: $(STAMP)
	$(PY) -m protos.build

bench: $(STAMP)
	$(PY) -m bench

# Triton's perf_analyzer through up's mesh vs one worker direct. The tool needs a venv of
# its own (tritonclient 2.41), Debian's libb64 and CUDA's runtime library: bench/perf_venv.sh.
bench-perf: $(STAMP)
	PYTHON=$(PYTHON) bash bench/perf_venv.sh
	$(PY) -m bench.perf_analyzer

# The worker against the floor server (bench/oip_floor.py), before (main) and after (issue 17).
bench-floor: $(STAMP)
	PYTHON=$(PYTHON) bash bench/perf_venv.sh
	$(PY) -m bench.worker_floor

clean:
	rm -rf $(VENV) bench/.perf-venv .mypy_cache .ruff_cache .pytest_cache
