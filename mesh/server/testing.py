"""In-process helpers for tests: a server on 127.0.0.1:0 and a channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import grpc.aio

from mesh.server.app import ServerSettings, Service, Serving, start_server


@asynccontextmanager
async def serve(
    services: Sequence[Service], settings: ServerSettings | None = None
) -> AsyncIterator[tuple[Serving, grpc.aio.Channel]]:
    """Runs ``services`` on a free loopback port; yields the server and a channel."""
    serving = await start_server(settings or ServerSettings(), services)
    channel = grpc.aio.insecure_channel(serving.address, options=serving.settings.channel_options())
    try:
        yield serving, channel
    finally:
        await channel.close()
        await serving.drain(grace=0)
