"""``meshserve worker inference``: serve a model repository over the Open Inference Protocol."""

from __future__ import annotations

import argparse

from mesh.server.listen import add_listen_arguments, server_settings
from workers.inference.server import SERVE_WITH, WorkerSettings, main


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "inference", help="serve models over the Open Inference Protocol (Triton/KServe v2 gRPC)"
    )
    parser.add_argument("--model-repo", required=True, help="model repository URL or directory")
    add_listen_arguments(parser, default_port=8001)
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if present"
    )
    parser.add_argument(
        "--memory-budget",
        type=int,
        default=0,
        metavar="BYTES",
        help="bytes of loaded weights to keep (GPU memory on CUDA); 0: no limit",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often to scan the repository for new versions (0: never)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads for forward passes (0: torch's default, one per core)",
    )
    parser.add_argument(
        "--preload-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before loading, wait this long for the sidecar's list of the versions the "
        "ring routes here and load those first (0: load every servable version at once)",
    )
    parser.add_argument(
        "--no-batching", action="store_true", help="run every request alone (for comparison)"
    )
    parser.add_argument(
        "--serve-with",
        choices=SERVE_WITH,
        default="h2",
        help="h2 (default): ModelInfer/ModelStreamInfer on the mesh's HTTP/2 engine, the rest "
        "on grpc.aio behind it; grpc: everything on grpc.aio",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = WorkerSettings(
        model_repo=args.model_repo,
        device=args.device,
        memory_budget_bytes=args.memory_budget,
        poll_interval_s=args.poll_interval,
        batching=not args.no_batching,
        threads=args.threads,
        preload_wait_s=args.preload_wait,
        serve_with=args.serve_with,
    )
    return main(settings, server_settings(args))
