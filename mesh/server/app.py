"""Builds, runs and drains a meshserve gRPC server with the parts every server has."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from mesh.header_limits import MAX_SERVER_METADATA
from mesh.security.guard import GuardInterceptor
from mesh.server import memory, reflection
from mesh.server.health_port import serve_health_port
from mesh.server.interceptor import ErrorMappingInterceptor
from mesh.server.sidecar_secret import SecretCheck

log = logging.getLogger(__name__)

#: grpc's default is 4 MiB; tritonclient sends up to 2 GiB, so servers raise it.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_MESSAGE_BYTES_LIMIT = 2**31 - 1
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: Where a health port listens: every interface, since the kubelet dials the pod's IP while
#: the worker itself may listen on localhost only (behind its sidecar).
HEALTH_PORT_HOST = "0.0.0.0"


@dataclass(frozen=True)
class ServerSettings:
    """Where and how a server listens. Validated on construction."""

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: How long a drain waits for in-flight calls before cancelling them.
    grace_seconds: float = 10.0
    #: Serve only calls carrying this secret (the sidecar's; see mesh.server.sidecar_secret).
    sidecar_secret: str | None = field(default=None, repr=False)
    #: Also answer gRPC health, alone and in plaintext, on this port of every interface (0:
    #: any free), for the kubelet's probes (mesh.server.health_port); None: no such port.
    health_port: int | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 1 <= self.max_message_bytes <= MAX_MESSAGE_BYTES_LIMIT:
            raise ValueError(
                f"max_message_bytes must be in [1, {MAX_MESSAGE_BYTES_LIMIT}], "
                f"got {self.max_message_bytes}"
            )
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in [0, 65535], got {self.health_port}")

    @property
    def unix(self) -> bool:
        """``host`` is ``unix:PATH``: a Unix domain socket (``port`` is ignored)."""
        return self.host.startswith("unix:")

    @property
    def address(self) -> str:
        """What ``add_insecure_port`` and a channel take: ``HOST:PORT`` or ``unix:PATH``."""
        return self.host if self.unix else f"{self.host}:{self.port}"

    def channel_options(self) -> list[tuple[str, int]]:
        """Options for a client channel that talks to such a server."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]


@dataclass(frozen=True)
class Service:
    """A gRPC service to mount: its full name and how to add it to a server."""

    name: str
    register: Callable[[grpc.aio.Server], None]


@dataclass
class Serving:
    """A started server with its health state."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    settings: ServerSettings
    service_names: tuple[str, ...]
    #: The plaintext health-only listener (``settings.health_port``), once bound.
    health_address: str | None = None
    _on_drain: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _before_stop: list[Callable[[float], Awaitable[None]]] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        if self.settings.unix:
            return self.settings.host
        return f"{self.settings.host}:{self.port}"

    def on_drain(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Runs ``hook`` after the server stops taking calls (e.g. close a store)."""
        self._on_drain.append(hook)

    def before_stop(self, hook: Callable[[float], Awaitable[None]]) -> None:
        """Runs ``hook(grace)`` when a drain starts, before the server stops: a front
        that relays to this server (mesh.proxy) finishes its calls through it first."""
        self._before_stop.append(hook)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        grace = self.settings.grace_seconds if grace is None else grace
        for front in self._before_stop:
            await front(grace)
        await self.server.stop(grace)
        for hook in self._on_drain:
            await hook()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
        await self.server.wait_for_termination()


async def start_server(
    settings: ServerSettings,
    services: Sequence[Service],
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    serving: bool = True,
) -> Serving:
    """Starts a server with health, reflection, raised limits and error mapping.

    ``credentials`` (e.g. from :mod:`mesh.security.rotation`) make the port TLS; without
    them it is plaintext. ``serving=False`` starts it NOT_SERVING (a worker that loads
    models first): its caller sets SERVING when it is ready.
    """
    # Every server may see large messages: memory they leave freed goes back to the system.
    memory.return_freed_memory()
    if settings.sidecar_secret is not None:
        # First after error mapping: a call without the secret reaches no other code.
        interceptors = [GuardInterceptor(SecretCheck(settings.sidecar_secret)), *interceptors]
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), *interceptors],
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Whatever the relay in front accepted and forwarded (see mesh.header_limits).
            ("grpc.max_metadata_size", MAX_SERVER_METADATA),
            ("grpc.absolute_max_metadata_size", MAX_SERVER_METADATA),
            # Two servers must never share a port silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for service in services:
        service.register(server)
    names = tuple(s.name for s in services)
    reflection.enable(server, (*names, HEALTH_SERVICE))
    try:
        address = settings.address
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {settings.address}: {exc}") from exc
    await server.start()
    started = Serving(server, health, port, settings, names)
    await started.set_serving(serving)
    if settings.health_port is not None:
        try:
            started.health_address = await serve_health_port(
                started, HEALTH_PORT_HOST, settings.health_port
            )
        except BaseException:
            await started.drain(0)
            raise
        log.info("health only, in plaintext, on %s", started.health_address)
    log.info("serving %s on %s", ", ".join(names), started.address)
    return started


async def serve_until_signal(serving: Serving) -> None:
    """Blocks until SIGTERM or SIGINT, then drains ``serving``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        stopped = asyncio.create_task(serving.wait_stopped())
        signalled = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("signal received: draining %s", serving.address)
            await serving.drain()
        for task in (stopped, signalled):
            task.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
