"""``meshserve worker data``: the data worker's command line."""

from __future__ import annotations

import argparse

from mesh.server.app import DEFAULT_MAX_MESSAGE_BYTES
from mesh.server.listen import add_listen_arguments, server_settings
from workers.data import server
from workers.data.storage import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_BYTES


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "data",
        help="run a data worker (stores datasets, streams batches)",
        description="Serves meshserve.data.v1.DataService over a dataset root.",
    )
    add_listen_arguments(parser, default_port=None)
    parser.add_argument(
        "--root", required=True, help="fsspec URL of the dataset root (a directory path works)"
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC message accepted or sent",
    )
    parser.add_argument(
        "--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="target size of chunk files"
    )
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=DEFAULT_CACHE_BYTES,
        help="memory for decoded chunks kept between batches",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=10.0,
        help="how long a drain waits for in-flight calls",
    )
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    config = server.DataWorkerConfig(
        server=server_settings(
            args, max_message_bytes=args.max_message_bytes, grace_seconds=args.grace_seconds
        ),
        root=args.root,
        chunk_bytes=args.chunk_bytes,
        cache_bytes=args.cache_bytes,
    )
    return server.main(config)
