"""``meshserve worker training``: runs a training worker process."""

from __future__ import annotations

import argparse
import asyncio

from mesh.server.app import ServerSettings
from workers.training.manager import WorkerSettings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "training", help="train catalogue models on data-service datasets and publish versions"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    parser.add_argument(
        "--artifacts", required=True, help="fsspec URL for checkpoints and job files"
    )
    parser.add_argument("--model-repo", required=True, help="fsspec URL of the model repository")
    parser.add_argument("--data", required=True, help="data service address HOST:PORT")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--state", default=None, help="job store directory (default: <artifacts>/state)"
    )
    parser.add_argument(
        "--max-concurrent-jobs", type=int, default=1, help="jobs that train at once (default 1)"
    )
    parser.add_argument(
        "--threads-per-rank",
        type=int,
        default=0,
        help="CPU threads per training process (default: cores / world_size)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from workers.training import server

    settings = WorkerSettings(
        artifacts_url=args.artifacts,
        model_repo_url=args.model_repo,
        data_address=args.data,
        device=args.device,
        max_concurrent_jobs=args.max_concurrent_jobs,
        threads_per_rank=args.threads_per_rank,
    )
    asyncio.run(server.run(settings, ServerSettings(host=args.host, port=args.port), args.state))
    return 0
