"""``meshserve bench``: a short closed-loop inference load through the gateway, as a table."""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
import grpc.aio
import numpy as np
from rich.console import Console
from rich.table import Table

from cli.endpoints import gateway_from_args
from cli.infer import NUMPY
from mesh.cli_error import CliError
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc
from registry.state_dir import add_state_dir_argument

out = Console()


def random_request(
    model: str, metadata: pb.ModelMetadataResponse, batch: int, seed: int
) -> pb.ModelInferRequest:
    """One request of ``batch`` rows of random inputs shaped as the metadata says."""
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=model)
    for tensor in metadata.inputs:
        if tensor.datatype not in NUMPY:
            raise CliError(f"input {tensor.name}: bench cannot generate {tensor.datatype}")
        shape = [batch if d < 0 else d for d in tensor.shape]
        array = rng.standard_normal(shape).astype(NUMPY[tensor.datatype])
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(array.tobytes())
    return request


async def load(
    address: str, request: pb.ModelInferRequest, concurrency: int, duration: float
) -> tuple[list[float], int, float]:
    """Runs ``concurrency`` callers for ``duration`` s; (latencies s, errors, elapsed s)."""
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request, timeout=30)  # warm-up: weights loaded, connections up
        began = time.perf_counter()
        stop_at = began + duration

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    await stub.ModelInfer(request, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return latencies, errors, elapsed


def run(args: argparse.Namespace) -> int:
    address = gateway_from_args(args, args.address)
    with grpc.insecure_channel(address) as channel:
        metadata = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=args.model), timeout=10
        )
    request = random_request(args.model, metadata, args.batch_size, args.seed)
    table = Table(
        title=f"{args.model} through {address}, batch {args.batch_size}, {args.duration:.0f} s each"
    )
    for column in (
        "concurrency",
        "requests",
        "errors",
        "req/s",
        "rows/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
    ):
        table.add_column(column, justify="right")
    for concurrency in args.concurrency:
        with out.status(f"concurrency {concurrency}"):
            latencies, errors, elapsed = asyncio.run(
                load(address, request, concurrency, args.duration)
            )
        if not latencies:
            raise CliError(f"every request failed at concurrency {concurrency} ({errors} errors)")
        ms = np.percentile(np.asarray(latencies) * 1000, [50, 90, 99])
        rate = len(latencies) / elapsed
        table.add_row(
            str(concurrency),
            str(len(latencies)),
            str(errors),
            f"{rate:,.0f}",
            f"{rate * args.batch_size:,.0f}",
            *(f"{v:.2f}" for v in ms),
        )
    out.print(table)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="a short inference load through the gateway: latency and throughput",
        description="Closed-loop ModelInfer load with random inputs shaped from ModelMetadata, "
        "at each concurrency in turn.",
    )
    parser.add_argument("model", nargs="?", default="demo", help="model (default: demo)")
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 8, 32],
        help="concurrent callers, one run each (default: 1 8 32)",
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", default=None, help="gateway (default: the running up)")
    add_state_dir_argument(parser)
    parser.set_defaults(handler=run)
