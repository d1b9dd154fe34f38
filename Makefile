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

# Runs a command as one set-up step: its label, then "done in N s" (or how it failed) on
# the same line. The first `make up`/`make test` takes minutes (torch alone is hundreds of
# MB): a line per step says what it is doing and how long each part took, not a silence.
STEP = $(PYTHON) -c 'import subprocess, sys, time; \
print(sys.argv[1], "...", end=" ", flush=True); start = time.monotonic(); \
code = subprocess.call(sys.argv[2:]); took = time.monotonic() - start; \
print(f"done in {took:.1f} s" if code == 0 else f"FAILED (exit {code}) after {took:.1f} s", \
flush=True); sys.exit(code)'

$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (first use, or pyproject.toml changed):"
	@if test -x $(PY); then echo "[1/3] virtual environment $(VENV): exists"; \
	else $(STEP) "[1/3] creating the virtual environment $(VENV)" $(PYTHON) -m venv $(VENV); fi
	@$(STEP) "[2/3] installing torch ($(TORCH_SPEC))" $(PY) -m pip install $(PIP_FLAGS) $(TORCH_SPEC)
	@# k8s and bench too: mypy checks cli/autoscale.py and bench/autoscale.py against them.
	@$(STEP) "[3/3] installing meshserve with its dev, triton, datasets, k8s and bench extras" \
		$(PY) -m pip install $(PIP_FLAGS) -e ".[dev,triton,datasets,k8s,bench]"
	@touch $(STAMP)
	@echo "$(VENV) is ready"

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
