"""Mirrors the worker's grpc.health.v1 status (Watch) into a callback, reconnecting on loss,
and probes that the worker still answers (Check with a deadline), as a readiness probe does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.sidecar.liveness import MIN_FAILURES, Hung, Liveness

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

#: Seconds between liveness probes, a probe's deadline, and how many missed deadlines in a
#: row make the worker unresponsive (Kubernetes' readiness probe's periodSeconds,
#: timeoutSeconds and failureThreshold, shortened: the gateway should stop sending calls
#: to a hung worker well within a client's deadline).
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
#: The same count liveness needs before a verdict: a worker is out of routing before it
#: can be killed.
PROBE_FAILURES = MIN_FAILURES


class HealthMirror:
    """Follows ``Health/Watch`` on the worker; calls ``on_change(serving)`` on every change.

    A broken stream (worker down, restarting) counts as not serving at once, then the
    watch is retried with backoff (``retry`` doubling up to ``max_retry`` seconds), so a
    worker's state reaches the registry within one round trip, not a polling interval.

    A worker that hangs (stopped, deadlocked, its event loop blocked) keeps its connection
    and its open Watch stream: nothing ends, so the watch alone would report it SERVING
    for as long as it hangs while every call sent to it times out. A ``Check`` every
    ``probe_interval`` seconds catches that: ``probe_failures`` deadlines missed in a row
    make the worker not serving until it answers again.

    With ``liveness``, a hang that lasts its window is reported once to ``on_hung`` (the
    unit then kills the worker, to be restarted: Kubernetes' livenessProbe); ``clock`` times
    the probes for it.
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
        probe_interval: float = PROBE_INTERVAL_S,
        probe_timeout: float = PROBE_TIMEOUT_S,
        probe_failures: int = PROBE_FAILURES,
        liveness: Liveness | None = None,
        on_hung: Callable[[Hung], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if probe_interval <= 0 or probe_timeout <= 0 or probe_failures < 1:
            raise ValueError(
                "probe_interval and probe_timeout must be > 0 and probe_failures >= 1, got "
                f"{probe_interval}, {probe_timeout}, {probe_failures}"
            )
        if (liveness is None) != (on_hung is None):
            raise ValueError("liveness and on_hung go together")
        self._liveness = liveness
        self._on_hung = on_hung
        self._clock = clock
        self._metadata = metadata
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._on_change = on_change
        self._service = service
        self._retry = retry
        self._max_retry = max_retry
        self._sleep = sleep
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._probe_failures = probe_failures
        #: What the worker's Watch says (None: nothing yet).
        self._watched: bool | None = None
        #: Whether it answered one of its last ``probe_failures`` probes in time.
        self._responsive = True
        self.serving: bool | None = None

    async def _publish(self) -> None:
        serving = bool(self._watched) and self._responsive
        if self._watched is not None and serving != self.serving:
            self.serving = serving
            log.info("worker is %s", "SERVING" if serving else "NOT_SERVING")
            await self._on_change(serving)

    async def _set(self, serving: bool) -> None:
        self._watched = serving
        await self._publish()

    async def run(self) -> None:
        probe = asyncio.create_task(self._probe())
        try:
            await self._watch()
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe

    async def _watch(self) -> None:
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

    async def _probe(self) -> None:
        request = health_pb2.HealthCheckRequest(service=self._service)
        missed = 0
        while True:
            await self._sleep(self._probe_interval)
            sent_at = self._clock()
            try:
                await self._stub.Check(
                    request, timeout=self._probe_timeout, metadata=self._metadata
                )
                answered = True
            except grpc.aio.AioRpcError as error:
                # Only silence is a hang: a refusal or an error status is an answer (a
                # worker that is down or not serving is the watch's to report).
                answered = error.code() != grpc.StatusCode.DEADLINE_EXCEEDED
            missed = 0 if answered else missed + 1
            responsive = missed < self._probe_failures
            if responsive != self._responsive:
                self._responsive = responsive
                if not responsive:
                    log.warning(
                        "worker missed %d health checks of %.1f s in a row: not serving "
                        "until it answers",
                        missed,
                        self._probe_timeout,
                    )
                await self._publish()
            if self._liveness is not None and self._on_hung is not None:
                hung = self._liveness.probed(sent_at, answered, self._clock())
                if hung is not None:
                    log.error(
                        "worker answered no health check for %.1f s (%d missed in a row, "
                        "liveness window %.1f s): giving up on it",
                        hung.silent_s,
                        hung.missed,
                        self._liveness.window_s,
                    )
                    on_hung, self._on_hung = self._on_hung, None  # once: the unit ends
                    await on_hung(hung)
