"""Mirrors the worker's grpc.health.v1 status (Watch) into a callback, reconnecting on loss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class HealthMirror:
    """Follows ``Health/Watch`` on the worker; calls ``on_change(serving)`` on every change.

    A broken stream (worker down, restarting) counts as not serving at once, then the
    watch is retried with backoff (``retry`` doubling up to ``max_retry`` seconds), so a
    worker's state reaches the registry within one round trip, not a polling interval.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        on_change: Callable[[bool], Awaitable[None]],
        *,
        service: str = "",
        retry: float = 0.1,
        max_retry: float = 1.0,
        sleep: Sleep = asyncio.sleep,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._metadata = metadata
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._on_change = on_change
        self._service = service
        self._retry = retry
        self._max_retry = max_retry
        self._sleep = sleep
        self.serving: bool | None = None

    async def _set(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            log.info("worker is %s", "SERVING" if serving else "NOT_SERVING")
            await self._on_change(serving)

    async def run(self) -> None:
        delay = self._retry
        request = health_pb2.HealthCheckRequest(service=self._service)
        while True:
            try:
                async for reply in self._stub.Watch(request, metadata=self._metadata):
                    delay = self._retry
                    await self._set(reply.status == health_pb2.HealthCheckResponse.SERVING)
                # The worker ended the stream (it is shutting down): not serving.
                await self._set(False)
            except grpc.aio.AioRpcError as error:
                log.debug("health watch failed: %s", error.code())
                await self._set(False)
            await self._sleep(delay)
            delay = min(self._max_retry, delay * 2)
