"""HealthMirror against a real server: Watch through the shared interceptors, loss, recovery."""

from __future__ import annotations

import asyncio

import grpc.aio

from mesh.server.app import ServerSettings, start_server
from mesh.sidecar.health import HealthMirror


async def test_mirror_follows_watch_and_treats_a_lost_worker_as_not_serving() -> None:
    seen: list[bool] = []
    changed = asyncio.Event()

    async def record(serving: bool) -> None:
        seen.append(serving)
        changed.set()

    async def next_change() -> bool:
        await asyncio.wait_for(changed.wait(), timeout=10)
        changed.clear()
        return seen[-1]

    worker = await start_server(ServerSettings(), [])
    channel = grpc.aio.insecure_channel(worker.address)
    task = asyncio.create_task(HealthMirror(channel, record, retry=0.05).run())
    try:
        assert await next_change() is True
        await worker.set_serving(False)
        assert await next_change() is False
        await worker.set_serving(True)
        assert await next_change() is True
        await worker.drain(grace=0)
        assert await next_change() is False
        assert seen == [True, False, True, False]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()
        await worker.drain(grace=0)
