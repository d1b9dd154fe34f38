#!/usr/bin/env bash
# Builds the separate venv that holds Triton's perf_analyzer (make bench-perf runs this).
#
# perf_analyzer ships inside the tritonclient 2.41 wheel; the project's own venv has a
# newer tritonclient without it, so the tool gets a venv of its own. Its binary links
# against Debian's libb64 and CUDA's runtime library (even for gRPC on the CPU): the
# first comes from apt, the second from the nvidia-cuda-runtime-cu12 wheel, found at
# run time through LD_LIBRARY_PATH (bench/perf_analyzer.py sets it).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
VENV="${PERF_VENV:-bench/.perf-venv}"
STAMP="$VENV/.installed"
[ -f "$STAMP" ] && exit 0
if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
    apt-get update -qq
    apt-get install -y -qq libb64-0d
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq --disable-pip-version-check \
    "tritonclient[grpc]==2.41.0" nvidia-cuda-runtime-cu12
touch "$STAMP"
