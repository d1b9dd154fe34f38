#!/usr/bin/env bash
# One run on a lent GPU machine: install the carried wheels, show the GPU and versions,
# run the CUDA tests, then the GPU serving benchmark; logs go to $OUT (or /tmp/gpu-out).
#
#   bash bench/gpu_device.sh [bench.gpu_serving args]
#
# Wheels: cp312 manylinux wheels of what the machine's python3 lacks, in ../.whl (see
# docs/benchmarks.md, issue 17 GPU section, for the list and the download command).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ls ../.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site ../.whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi || true
    "$PY" -c "import sys, torch, grpc, google.protobuf as p; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'grpcio', grpc.__version__, 'protobuf', p.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$PY" -c "import cli.main, registry.embedded, gateway.app, workers.inference.server; print('imports ok')"
} 2>&1 | tee "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/workers/inference/test_cuda_runner.py tests/workers/inference/test_cuda.py \
    tests/workers/inference/test_gpu_plan.py 2>&1 | tee "$OUT/tests.txt"
timeout "${BENCH_TIMEOUT:-230}" "$PY" -m bench.gpu_serving "$@" 2>&1 | tee "$OUT/bench.txt"
# Time left in the call: one more probe, worker only (default: the FP16 run with the GIL's
# switch interval at 0.5 ms, to test whether GIL hand-offs hold the worker's batches back).
if [ "$SECONDS" -lt "${EXTRA_BEFORE_S:-270}" ]; then
    # shellcheck disable=SC2086  # EXTRA is a list of arguments
    timeout 100 "$PY" -m bench.gpu_serving ${EXTRA:---models fp16 --no-mesh --seconds 6 --switch-interval 0.0005} \
        2>&1 | tee "$OUT/bench_extra.txt"
fi
