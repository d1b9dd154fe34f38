"""Triton's perf_analyzer through ``meshserve up``'s mesh against one inference worker direct.

Run: ``make bench-perf`` (builds the tool's venv on first use, then runs this), or, once
``bench/perf_venv.sh`` has built ``bench/.perf-venv``:
``.venv/bin/python -m bench.perf_analyzer [--requests 1000] [--concurrency 8 32]``

perf_analyzer ships inside the ``tritonclient==2.41.0`` wheel (newer wheels dropped it), so
it lives in a venv of its own; it links against Debian's libb64 and CUDA's runtime library
even for gRPC on the CPU (the ``nvidia-cuda-runtime-cu12`` wheel's, found through
``LD_LIBRARY_PATH``). Nothing here downloads anything.

One run: a model repository with a TorchScript MLP 64→256→256→10 with dynamic batching
(``<model>/1/model.pt`` and ``config.pbtxt``, Triton's layout); (a) one ``meshserve worker
inference`` on it, direct; (b) a ``meshserve up`` mesh (temporary ``--state-dir`` whose
``models/`` is this repository, ``--no-demo``; two inference workers, each behind its
sidecar) through its gateway: gateway → sidecar (mTLS) → worker. perf_analyzer measures
each (``-i grpc``, count windows; when a busy machine never gives three windows within
30 %, the cell is measured again within 100 % and marked) at each concurrency; a table gives
infer/s, p50 and p99 per path and concurrency with the mesh's ratios against direct.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from bench.children import ENV, REPO, process
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from workers.inference import testing

MODEL = "mlp"
VENV = REPO / "bench" / ".perf-venv"
DIRECT = "one worker, direct"
MESH = "up: gateway → sidecar (mTLS) → worker"
READY_TIMEOUT_S = 180.0


class PerfMLP(nn.Module):
    """FP32 [B, 64] -> [B, 10] through two hidden layers of 256."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def build_repository(path: Path, queue_delay_us: int = 500) -> None:
    """``mlp/config.pbtxt`` (dynamic batching, batches up to 64, waiting up to
    ``queue_delay_us`` for a fuller batch) and ``mlp/1/model.pt``."""
    config = testing.model_config(
        MODEL,
        [("x", testing.FP32, [64])],
        [("y", testing.FP32, [10])],
        max_batch_size=64,
        queue_delay_us=queue_delay_us,
    )
    testing.publish(str(path), config, testing.seeded(PerfMLP(), 0))


def tool() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary and an environment that finds its CUDA runtime."""
    binary = VENV / "bin" / "perf_analyzer"
    cudart = sorted(VENV.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    if not binary.exists() or not cudart:
        raise SystemExit(f"no perf_analyzer in {VENV}: run `make bench-perf` (bench/perf_venv.sh)")
    library_path = os.pathsep.join(
        filter(None, [str(cudart[0]), os.environ.get("LD_LIBRARY_PATH")])
    )
    return binary, {**os.environ, "LD_LIBRARY_PATH": library_path}


@dataclass(frozen=True)
class Row:
    path: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    #: Measured under the first stability criterion (see STABILITY).
    stable: bool = True


#: perf_analyzer's stability criteria, tried in turn: three windows within 30 %, then
#: (a busy shared machine may never settle) within 100 %; a row measured under the
#: looser one is marked in the table.
STABILITY = (30, 100)


def analyze(address: str, path: str, concurrency: Sequence[int], requests: int) -> list[Row]:
    """perf_analyzer at each concurrency against ``address``; its CSV report, parsed."""
    binary, env = tool()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as out:
        report = Path(out) / "report.csv"
        for c in concurrency:
            for stability in STABILITY:
                command = [
                    str(binary),
                    *("-m", MODEL, "-i", "grpc", "-u", address),
                    *("--concurrency-range", f"{c}:{c}"),
                    *("--measurement-mode", "count_windows"),
                    *("--measurement-request-count", str(requests)),
                    *("--stability-percentage", str(stability), "--max-trials", "8"),
                    *("-f", str(report)),
                ]
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
                if done.returncode == 0 and report.exists():
                    break
                if "stable measurement" not in done.stdout + done.stderr:
                    break  # not a matter of noise: report it below
            if done.returncode != 0 or not report.exists():
                raise RuntimeError(
                    f"perf_analyzer failed on {path} at c={c} ({done.returncode}):\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
                )
            with report.open() as f:
                for line in csv.DictReader(f):
                    rows.append(
                        Row(
                            path,
                            int(line["Concurrency"]),
                            float(line["Inferences/Second"]),
                            float(line["p50 latency"]) / 1000,
                            float(line["p99 latency"]) / 1000,
                            stable=stability == STABILITY[0],
                        )
                    )
            report.unlink()
    return rows


def wait_model_ready(address: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=5).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"model {MODEL} not ready at {address} in {READY_TIMEOUT_S:.0f} s")


@contextmanager
def mesh(repo: Path, training: int, data: int) -> Iterator[str]:
    """``meshserve up`` on a temporary state dir whose model repository is ``repo``."""
    state = Path(tempfile.mkdtemp(prefix="perf-up-"))
    shutil.copytree(repo, state / "models")
    log = state / "up.log"
    with log.open("w") as sink:
        up = subprocess.Popen(
            [
                *(sys.executable, "-m", "cli.main", "up"),
                *("--state-dir", str(state), "--port", "0", "--no-demo"),
                *("--training-workers", str(training), "--data-workers", str(data)),
            ],
            cwd=REPO,
            env={**ENV, "COLUMNS": "200"},
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if up.poll() is not None:
                raise RuntimeError(f"up exited: {log.read_text()[-2000:]}")
            try:
                gateway = str(json.loads((state / "up.json").read_text())["gateway"])
                break
            except (OSError, ValueError, KeyError):
                if time.monotonic() > deadline:
                    raise RuntimeError("up was not ready in time") from None
                time.sleep(0.5)
        yield gateway
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        shutil.rmtree(state, ignore_errors=True)


def table(rows: list[Row], concurrency: Sequence[int]) -> Table:
    out = Table(
        title="perf_analyzer, gRPC, MLP 64→256→256→10 with dynamic batching (CPU)",
        caption=(
            f"* windows stable only within {STABILITY[-1]} % (busy machine)"
            if any(not r.stable for r in rows)
            else None
        ),
    )
    for name in ("path", "concurrency", "infer/s", "p50 ms", "p99 ms", "infer/s / direct"):
        out.add_column(name, justify="left" if name == "path" else "right")
    out.add_column("p99 / direct p99", justify="right")
    direct = {r.concurrency: r for r in rows if r.path == DIRECT}
    for path in (DIRECT, MESH):
        for c in concurrency:
            r = next(x for x in rows if x.path == path and x.concurrency == c)
            base = direct[c]
            out.add_row(
                path,
                str(c),
                f"{r.throughput:.0f}{'' if r.stable else '*'}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                f"{r.throughput / base.throughput:.2f}",
                f"{r.p99_ms / base.p99_ms:.2f}",
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per count window (perf_analyzer)"
    )
    parser.add_argument(
        "--training-workers",
        type=int,
        default=0,
        help="up's training workers (default 0: idle on this path, they only take memory)",
    )
    parser.add_argument("--data-workers", type=int, default=0, help="up's data workers")
    args = parser.parse_args(argv)
    tool()  # fail before starting anything
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="perf-repo-") as tmp:
        repo = Path(tmp)
        build_repository(repo)
        # up runs its inference workers with one torch thread: the direct worker too.
        worker = ["cli.main", "worker", "inference", "--port", "0", "--threads", "1"]
        with process(*worker, "--model-repo", str(repo), "--poll-interval", "0") as direct:
            wait_model_ready(direct)
            rows += analyze(direct, DIRECT, args.concurrency, args.requests)
        with mesh(repo, args.training_workers, args.data_workers) as gateway:
            wait_model_ready(gateway)
            rows += analyze(gateway, MESH, args.concurrency, args.requests)
    Console(width=160).print(table(rows, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
