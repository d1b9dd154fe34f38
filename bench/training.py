"""Training throughput: the training service against a plain PyTorch loop, and world_size 1 vs 2.

Run: ``.venv/bin/python -m bench.training [--examples N] [--epochs E] [--device cpu|cuda]``.

Both sides train the same MLP with the same optimiser, batch size and data. The
plain loop reads the training split from memory; the service streams it from a
real data service over gRPC, in a separate training process. Throughput is
examples per second over training steps only (the service's StepLoss windows
exclude its per-epoch validation); "wall" is submit to SUCCEEDED, including
process start, validation, export and publishing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
import torch
from rich.console import Console
from rich.table import Table

from mesh.server.app import ServerSettings
from protos.meshserve.data.v1 import data_pb2, data_pb2_grpc
from protos.meshserve.training.v1 import training_pb2, training_pb2_grpc
from workers.data.server import DataWorkerConfig
from workers.data.server import start as start_data
from workers.training import catalogue
from workers.training.batches import DataClient, StreamRequest
from workers.training.loop import build_network, build_optimizer
from workers.training.manager import WorkerSettings
from workers.training.metrics import loss_fn
from workers.training.server import training_worker

DATASET = "bench-blobs"


@dataclass
class Result:
    name: str
    examples_per_second: float
    wall_seconds: float
    val_accuracy: float


def job_spec(epochs: int, batch_size: int, world_size: int, device: str) -> training_pb2.JobSpec:
    return training_pb2.JobSpec(
        model_name=f"bench-ws{world_size}",
        architecture=training_pb2.Architecture(mlp=training_pb2.MlpSpec(hidden_sizes=[256, 256])),
        dataset=training_pb2.DatasetRef(name=DATASET),
        optimizer=training_pb2.Optimizer(kind=training_pb2.OPTIMIZER_KIND_ADAM, learning_rate=1e-3),
        epochs=epochs,
        batch_size=batch_size,
        seed=1,
        standardize=True,
        log_every_steps=20,
        world_size=world_size,
        device=device,
    )


def plain_loop(
    address: str, dataset: data_pb2.Dataset, spec: training_pb2.JobSpec, threads: int
) -> Result:
    """The baseline: the same network and optimiser over in-memory tensors."""
    torch.set_num_threads(threads)  # what the service's training process is given
    sig = catalogue.signature_of(dataset.schema)
    client = DataClient(address)
    try:
        request = StreamRequest(dataset.name, dataset.version, data_pb2.SPLIT_TRAIN, 4096)
        parts = list(client.batches(request))
        vrequest = StreamRequest(dataset.name, dataset.version, data_pb2.SPLIT_VALIDATION, 4096)
        vparts = list(client.batches(vrequest))
    finally:
        client.close()
    x = torch.cat([p[sig.input_name] for p in parts])
    y = torch.cat([p[sig.label_name] for p in parts])
    device = torch.device(spec.device or "cpu")
    x, y = x.to(device), y.to(device)
    torch.manual_seed(spec.seed)
    model = build_network(spec, dataset).to(device)
    optimizer = build_optimizer(spec, model.parameters())
    # Measured like the service measures itself: examples/s over windows of
    # log_every_steps steps, the first window (warm-up) dropped, the median kept.
    rates: list[float] = []
    window_start, window_examples, step = time.perf_counter(), 0, 0
    start = time.perf_counter()
    for _ in range(spec.epochs):
        model.train()
        order = torch.randperm(x.shape[0], device=device)
        for i in range(0, x.shape[0], spec.batch_size):
            index = order[i : i + spec.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[index]), y[index], sig.is_classification)
            loss.backward()  # type: ignore[no-untyped-call]
            if not torch.isfinite(loss):
                raise RuntimeError("baseline diverged")
            optimizer.step()
            step += 1
            window_examples += int(index.shape[0])
            if step % spec.log_every_steps == 0:
                now = time.perf_counter()
                rates.append(window_examples / (now - window_start))
                window_start, window_examples = now, 0
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        vx = torch.cat([p[sig.input_name] for p in vparts]).to(device)
        vy = torch.cat([p[sig.label_name] for p in vparts]).to(device)
        accuracy = float((model(vx).argmax(1) == vy).float().mean())
    return Result("plain PyTorch loop", statistics.median(rates[1:] or rates), elapsed, accuracy)


async def baseline(
    address: str, dataset: data_pb2.Dataset, spec: training_pb2.JobSpec, threads: int
) -> Result:
    # In its own spawned process, like the service's training process, so both start
    # from the same interpreter and thread-pool state.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await asyncio.get_running_loop().run_in_executor(
            pool, plain_loop, address, dataset, spec, threads
        )


def median_of(runs: list[Result]) -> Result:
    return Result(
        runs[0].name,
        statistics.median(r.examples_per_second for r in runs),
        statistics.median(r.wall_seconds for r in runs),
        statistics.median(r.val_accuracy for r in runs),
    )


async def through_service(
    stub: training_pb2_grpc.TrainingServiceAsyncStub, spec: training_pb2.JobSpec
) -> Result:
    start = time.perf_counter()
    job = await stub.SubmitJob(training_pb2.SubmitJobRequest(spec=spec))
    rates: list[float] = []
    async for event in stub.WatchJob(training_pb2.WatchJobRequest(job_id=job.id)):
        if event.HasField("step_loss"):
            rates.append(event.step_loss.examples_per_second)
    wall = time.perf_counter() - start
    done = await stub.GetJob(training_pb2.GetJobRequest(job_id=job.id))
    if done.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {done.id} ended {done.state}: {done.message}")
    # Skip the first window: it includes the process's warm-up (allocator, first stream).
    steady = rates[1:] or rates
    return Result(
        f"service, world_size={max(1, spec.world_size)}",
        statistics.median(steady),
        wall,
        done.metrics["val_accuracy"],
    )


async def main(args: argparse.Namespace) -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = await start_data(DataWorkerConfig(server=ServerSettings(), root=str(root / "data")))
        channel = grpc.aio.insecure_channel(data.address)
        try:
            dataset = await data_pb2_grpc.DataServiceStub(channel).CreateBuiltinDataset(
                data_pb2.CreateBuiltinDatasetRequest(
                    name=DATASET,
                    seed=1,
                    blobs=data_pb2.BlobsSource(
                        num_examples=args.examples,
                        num_classes=10,
                        num_features=32,
                        cluster_std=12.0,
                    ),
                )
            )
            settings = WorkerSettings(
                artifacts_url=str(root / "artifacts"),
                model_repo_url=str(root / "models"),
                data_address=data.address,
                device=args.device,
                threads_per_rank=args.threads,
            )
            runs: list[Result] = []
            spec1 = job_spec(args.epochs, args.batch_size, 1, args.device)
            spec2 = job_spec(args.epochs, args.batch_size, 2, args.device)
            async with training_worker(settings, ServerSettings()) as worker:
                async with grpc.aio.insecure_channel(worker.serving.address) as tchannel:
                    stub = training_pb2_grpc.TrainingServiceStub(tchannel)
                    # Interleaved repeats, so a noisy neighbour hurts every variant alike.
                    for _ in range(args.repeats):
                        runs.append(await baseline(data.address, dataset, spec1, args.threads))
                        runs.append(await through_service(stub, spec1))
                        runs.append(await through_service(stub, spec2))
        finally:
            await channel.close()
            await data.drain(grace=0)

    names = list(dict.fromkeys(r.name for r in runs))
    results = [median_of([r for r in runs if r.name == name]) for name in names]
    base = results[0].examples_per_second
    table = Table(
        title=(
            f"Training throughput: MLP 32-256-256-10, {dataset.num_train} training examples, "
            f"batch {args.batch_size}/rank, {args.epochs} epochs, {args.device}, "
            f"{args.threads} thread(s) per process, median of {args.repeats}"
        )
    )
    for column in ("run", "examples/s", "vs plain loop", "wall s", "val accuracy"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in results:
        table.add_row(
            r.name,
            f"{r.examples_per_second:,.0f}",
            f"{r.examples_per_second / base:.2f}x",
            f"{r.wall_seconds:.1f}",
            f"{r.val_accuracy:.3f}",
        )
    console.print(table)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per training process, the same for both sides (default 1)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each variant")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
