"""``meshserve worker training``: runs a training worker process."""

from __future__ import annotations

import argparse
import asyncio
import os

from mesh.cli_error import CliError
from mesh.server.listen import add_listen_arguments, server_settings
from registry.connect import ES_URL_ENV, add_store_arguments, settings_from_args
from registry.jobs import DEFAULT_CLAIM_TTL
from workers.training.manager import WorkerSettings
from workers.training.nodes import NodeGroup


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "training", help="train catalogue models on data-service datasets and publish versions"
    )
    add_listen_arguments(parser, default_port=0)
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
    parser.add_argument(
        "--job-claim-ttl",
        type=float,
        default=DEFAULT_CLAIM_TTL,
        metavar="SECONDS",
        help="with a registry: how long a dead worker's jobs stay claimed before another "
        "worker resumes them (default %(default)s)",
    )
    nodes = parser.add_argument_group(
        "training across hosts (workers.training.nodes; torchrun's static group)"
    )
    nodes.add_argument("--nodes", type=int, default=1, help="training nodes in the group")
    nodes.add_argument(
        "--node-rank",
        type=int,
        default=0,
        help="0: this worker takes jobs and leads; other: a follower that takes no jobs and "
        "runs its ranks of node 0's jobs",
    )
    nodes.add_argument(
        "--rendezvous", metavar="HOST:PORT", help="node 0's rendezvous address (every node)"
    )
    nodes.add_argument("--ranks-per-node", type=int, default=1)
    # With --es (or $MESHSERVE_ES_URL) jobs live in the registry, shared by every training
    # worker, and published versions are recorded in the model catalog.
    add_store_arguments(parser)
    for action in parser._actions:
        if action.dest == "es":
            # Unlike the registry commands, no URL means the local job store, not the
            # store of `meshserve up`: a worker never joins a registry by accident.
            action.help = (
                f"registry URL: jobs live there, shared by every training worker, and "
                f"published versions go into the model catalog (default: ${ES_URL_ENV}; "
                f"unset: jobs in --state)"
            )
    parser.set_defaults(handler=run)


def _node_group(args: argparse.Namespace) -> NodeGroup | None:
    if args.nodes == 1:
        return None
    if not args.rendezvous:
        raise CliError("--nodes needs --rendezvous HOST:PORT (node 0's address)")
    try:
        return NodeGroup(args.nodes, args.node_rank, args.rendezvous, args.ranks_per_node)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    from workers.training import server

    group = _node_group(args)
    if group is not None and group.node_rank > 0:
        from workers.training import follower

        asyncio.run(follower.run(group, args.data, args.device, server_settings(args)))
        return 0
    settings = WorkerSettings(
        artifacts_url=args.artifacts,
        model_repo_url=args.model_repo,
        data_address=args.data,
        device=args.device,
        max_concurrent_jobs=args.max_concurrent_jobs,
        threads_per_rank=args.threads_per_rank,
        node_group=group,
    )
    url = args.es or os.environ.get(ES_URL_ENV)
    registry = settings_from_args(args, url) if url else None
    if registry is not None and args.state is not None:
        raise CliError("--state keeps jobs on local disk; with --es they live in the registry")
    if args.job_claim_ttl <= 0:
        raise CliError(f"--job-claim-ttl must be positive, got {args.job_claim_ttl}")
    asyncio.run(
        server.run(
            settings,
            server_settings(args),
            args.state,
            registry,
            args.job_claim_ttl,
        )
    )
    return 0
