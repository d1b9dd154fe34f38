"""Runs a data worker process: the store, the server, and a drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from mesh.server.app import ServerSettings, Serving, serve_until_signal, start_server
from workers.data.service import data_service
from workers.data.storage import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_BYTES, DatasetStore

#: The line a data worker prints once it listens; `meshserve up` and tests read it
#: to learn the bound port when asked for port 0.
READY_PREFIX = "meshserve data worker listening on "


@dataclass(frozen=True)
class DataWorkerConfig:
    """Everything a data worker process needs."""

    server: ServerSettings
    root: str
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    cache_bytes: int = DEFAULT_CACHE_BYTES


async def start(config: DataWorkerConfig) -> Serving:
    """Opens the store (clearing interrupted uploads) and starts serving it."""
    store = await asyncio.to_thread(
        DatasetStore, config.root, chunk_bytes=config.chunk_bytes, cache_bytes=config.cache_bytes
    )
    return await start_server(config.server, [data_service(store, config.server.max_message_bytes)])


async def run(config: DataWorkerConfig) -> None:
    """Serves until SIGTERM or SIGINT, then finishes in-flight calls and returns."""
    serving = await start(config)
    print(f"{READY_PREFIX}{serving.address}", file=sys.stdout, flush=True)
    await serve_until_signal(serving)


def main(config: DataWorkerConfig) -> int:
    asyncio.run(run(config))
    return 0
