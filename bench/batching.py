"""Dynamic batching benchmark: throughput and p50/p99 latency, batching on vs off, on the CPU.

Run: ``.venv/bin/python -m bench.batching [--seconds 2] [--rounds 2] [--threads 1] [--device cpu]
[--no-optimize]``

Two workers are started as subprocesses (``meshserve worker inference``, one with
``--no-batching``) over the same repository of two models: an MLP whose batch-1 pass
is bound by reading its weights, and a small CNN with a dense classifier head. A
load generator in this process keeps 1, 8 and 64 requests in flight against each
for a fixed time, in interleaved rounds, and prints one table with both modes side by side
(throughput: the median over rounds; latency percentiles: over all rounds). Both models
are served with ``OPTIMIZE_FOR_INFERENCE`` (frozen, oneDNN graph) unless ``--no-optimize``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from bench.children import process
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from workers.inference import testing
from workers.inference.model import OPTIMIZE_PARAMETER

CONCURRENCY = (1, 8, 64)


class BenchMLP(nn.Module):
    """FP32 [B, 1024] -> [B, 16]; 21M parameters, so batch 1 is memory-bound."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 16)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class BenchCNN(nn.Module):
    """FP32 [B, 3, 32, 32] -> [B, 10]: two small convolutions and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(image).flatten(1))
        return out


@dataclass(frozen=True)
class BenchModel:
    name: str
    input_name: str
    dims: tuple[int, ...]


MODELS = (BenchModel("mlp", "x", (1024,)), BenchModel("cnn", "image", (3, 32, 32)))


def build_repository(path: Path, queue_delay_us: int, instances: int, optimize: bool) -> None:
    for spec, module in zip(MODELS, (BenchMLP(), BenchCNN()), strict=True):
        config = testing.model_config(
            spec.name,
            [(spec.input_name, testing.FP32, spec.dims)],
            [("out", testing.FP32, [16 if spec.name == "mlp" else 10])],
            max_batch_size=64,
            queue_delay_us=queue_delay_us,
        )
        config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
        # Both workers serve the same repository, so this applies to both modes alike.
        config.parameters[OPTIMIZE_PARAMETER].string_value = "true" if optimize else "false"
        testing.publish(str(path), config, testing.seeded(module, 0))


def worker(repo: Path, device: str, batching: bool, threads: int) -> AbstractContextManager[str]:
    """A ``meshserve worker inference`` child on ``repo``; yields its address."""
    args = ["cli.main", "worker", "inference", "--port", "0"]
    args += ["--model-repo", str(repo), "--device", device, "--poll-interval", "0"]
    args += ["--threads", str(threads)]
    if not batching:
        args.append("--no-batching")
    return process(*args, stop_timeout=20)


@dataclass(frozen=True)
class Sample:
    """One timed round of one cell."""

    latencies: list[float]
    elapsed: float
    inferences: int
    executions: int
    forward_ns: int


@dataclass(frozen=True)
class Cell:
    throughput: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    #: Forward-pass time per batch element, from the worker's own statistics.
    forward_ms_per_item: float

    @classmethod
    def of(cls, samples: list[Sample]) -> Cell:
        """Median throughput over rounds (robust to a noisy neighbour); pooled latencies."""
        latencies = [x for s in samples for x in s.latencies]
        quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
        executions = sum(s.executions for s in samples)
        inferences = sum(s.inferences for s in samples)
        return cls(
            throughput=statistics.median(len(s.latencies) / s.elapsed for s in samples),
            p50_ms=quantiles[49] * 1000,
            p99_ms=quantiles[98] * 1000,
            mean_batch=inferences / executions if executions else 0.0,
            forward_ms_per_item=sum(s.forward_ns for s in samples) / 1e6 / max(inferences, 1),
        )


def request_for(spec: BenchModel) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=spec.name)
    request.inputs.add(name=spec.input_name, datatype="FP32", shape=[1, *spec.dims])
    data = torch.randn(1, *spec.dims, generator=torch.Generator().manual_seed(1))
    request.raw_input_contents.append(data.numpy().tobytes())
    return request


async def counts(stub: pb_grpc.GRPCInferenceServiceAsyncStub, name: str) -> tuple[int, int, int]:
    """(inferences, executions, total forward ns) so far, from ModelStatistics."""
    reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))
    stats = reply.model_stats[0]
    forward = sum(b.compute_infer.ns for b in stats.batch_stats)
    return stats.inference_count, stats.execution_count, forward


async def measure(address: str, spec: BenchModel, concurrency: int, seconds: float) -> Sample:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = request_for(spec)
        latencies: list[float] = []
        loop = asyncio.get_running_loop()

        async def client(until: float, record: bool) -> None:
            while loop.time() < until:
                started = time.perf_counter()
                await stub.ModelInfer(request)
                if record:
                    latencies.append(time.perf_counter() - started)

        warm_until = loop.time() + min(0.5, seconds / 4)
        await asyncio.gather(*(client(warm_until, False) for _ in range(concurrency)))
        before = await counts(stub, spec.name)
        started = loop.time()
        await asyncio.gather(*(client(started + seconds, True) for _ in range(concurrency)))
        elapsed = loop.time() - started
        after = await counts(stub, spec.name)
    return Sample(
        latencies, elapsed, after[0] - before[0], after[1] - before[1], after[2] - before[2]
    )


async def run(on: str, off: str, seconds: float, rounds: int) -> dict[tuple[str, int, bool], Cell]:
    samples: dict[tuple[str, int, bool], list[Sample]] = {}
    for _ in range(rounds):
        for spec in MODELS:
            for concurrency in CONCURRENCY:
                # Interleaved so that load from elsewhere on the machine hits both modes alike.
                for batching, address in ((False, off), (True, on)):
                    sample = await measure(address, spec, concurrency, seconds)
                    samples.setdefault((spec.name, concurrency, batching), []).append(sample)
    return {key: Cell.of(values) for key, values in samples.items()}


def table(
    cells: dict[tuple[str, int, bool], Cell], device: str, threads: int, optimize: bool
) -> Table:
    per_worker = threads or torch.get_num_threads()
    graphs = "optimized for inference" if optimize else "as saved"
    out = Table(
        title=f"Inference batching on {device} ({per_worker} torch threads per worker, "
        f"models {graphs})"
    )
    for column in ("model", "concurrency"):
        out.add_column(column)
    for mode in ("off", "on"):
        out.add_column(f"req/s ({mode})", justify="right")
        out.add_column(f"p50 ms ({mode})", justify="right")
        out.add_column(f"p99 ms ({mode})", justify="right")
    out.add_column("mean batch (on)", justify="right")
    out.add_column("fwd ms/item off→on", justify="right")
    out.add_column("speed-up", justify="right")
    for spec in MODELS:
        for concurrency in CONCURRENCY:
            off, on = cells[spec.name, concurrency, False], cells[spec.name, concurrency, True]
            out.add_row(
                spec.name,
                str(concurrency),
                f"{off.throughput:.0f}",
                f"{off.p50_ms:.2f}",
                f"{off.p99_ms:.2f}",
                f"{on.throughput:.0f}",
                f"{on.p50_ms:.2f}",
                f"{on.p99_ms:.2f}",
                f"{on.mean_batch:.1f}",
                f"{off.forward_ms_per_item:.2f}→{on.forward_ms_per_item:.2f}",
                f"{on.throughput / off.throughput:.2f}x",
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="measured time per cell and round"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all cells")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--queue-delay-us",
        type=int,
        default=0,
        help="max_queue_delay_microseconds (0: batch whatever queued while the last batch ran)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (1: no oversubscription on a small shared box; 0: default)",
    )
    parser.add_argument(
        "--instances", type=int, default=1, help="instance_group count of both models"
    )
    parser.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"set the models' {OPTIMIZE_PARAMETER} config parameter (both modes alike)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repository(repo, args.queue_delay_us, args.instances, args.optimize)
        on_worker = worker(repo, args.device, True, args.threads)
        off_worker = worker(repo, args.device, False, args.threads)
        with on_worker as on, off_worker as off:
            cells = asyncio.run(run(on, off, args.seconds, args.rounds))
    # Wide enough for all columns even when stdout is not a terminal (CI logs, tee).
    Console(width=170).print(table(cells, args.device, args.threads, args.optimize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
