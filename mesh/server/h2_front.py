"""A server's hot RPCs on the relay's HTTP/2 engine; every other call relayed to grpc.aio.

Why: issue 17 measured grpc.aio's own call machinery (a task, a servicer context, its
completion-queue hops between grpc's threads and the event loop) as the floor under the
inference worker's request path. The relay (mesh/proxy/connection.py) already speaks
HTTP/2 sans-I/O on the event loop, with one write per input pass. Here the same engine
serves a few named methods in-process: it reads a call's frames, hands the decoded
request to the same servicer method grpc.aio would call (with a small context that
offers what those methods use), and writes the response, its trailers and any error
status itself. Every other call (health, reflection, model control, statistics) goes,
frames untouched, to the full grpc.aio server on a private Unix socket, as the gateway's
relay hands its own services to its server (mesh/proxy/call_routing.py ``_go_internal``).

What a gRPC server does for a call the front does too: deadlines (``grpc-timeout``:
DEADLINE_EXCEEDED, handler cancelled), cancellation (RST_STREAM cancels the handler),
compressed requests (gzip, deflate), the message size limit (RESOURCE_EXHAUSTED),
malformed calls (mesh/routing/callcheck.py), the door checks (the sidecar secret), error
mapping (mesh.server.interceptor.status_for) and a graceful drain (GOAWAY, then calls in
flight finish within the grace).

This module is the assembly: the front that listens, dials the server behind it and
drains. A client's connection is mesh/server/front_connection.py; a call served here,
mesh/server/local_call.py (its context: call_context.py); a call relayed,
mesh/server/passthrough.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from mesh.proxy import frames as f
from mesh.proxy.client_connection import ClientConnection
from mesh.proxy.flusher import Flusher
from mesh.server.app import ServerSettings, Service, Serving, start_server
from mesh.server.front_connection import FrontConnection
from mesh.server.local_call import LocalCall
from mesh.server.passthrough import Passthrough
from mesh.server.private import PrivateSocket
from mesh.server.sidecar_secret import SecretCheck

log = logging.getLogger(__name__)

#: Called before a hot method's handler, like a GuardInterceptor check: raises a MeshError
#: to refuse the call (mesh.server.sidecar_secret.SecretCheck).
Check = Callable[[str, Any], Awaitable[None]]


@dataclass(frozen=True)
class HotMethod:
    """A method the front serves itself, with the behaviour grpc.aio would call."""

    path: str
    #: Bytes to request; lenient (returns a marker the behaviour refuses) on bad input.
    parse: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    #: ``(request, context) -> response`` for a unary method; for a client- and
    #: server-streaming one ``(request iterator, context) -> response iterator``.
    behaviour: Callable[..., Any]
    streaming: bool = False


class Backend(ClientConnection):
    """The front's connection to the grpc.aio server behind it (a private Unix socket)."""


class H2Front:
    """Listens for clients; serves ``hot`` methods itself and relays the rest to
    ``internal_address`` (``unix:PATH``, the grpc.aio server's private socket)."""

    def __init__(
        self,
        hot: Iterable[HotMethod],
        internal_address: str,
        *,
        max_message_bytes: int,
        checks: Sequence[Check] = (),
    ) -> None:
        self.hot = {m.path.encode("latin-1"): m for m in hot}
        if not internal_address.startswith("unix:"):
            raise ValueError(
                f"the server behind the front listens on unix:PATH, not {internal_address!r}"
            )
        self.internal_path = internal_address[len("unix:") :]
        self.max_message_bytes = max_message_bytes
        self.checks = tuple(checks)
        self.loop = asyncio.get_running_loop()
        self.flusher = Flusher()
        self.calls: set[LocalCall | Passthrough] = set()
        self.connections: set[FrontConnection] = set()
        self.draining = False
        self._backend: Backend | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, settings: ServerSettings) -> int:
        """Listens where ``settings`` say (``unix:PATH`` or host/port); the bound port."""
        factory = lambda: FrontConnection(self)  # noqa: E731
        try:
            if settings.unix:
                server = await self.loop.create_unix_server(factory, settings.host[len("unix:") :])
                self._servers.append(server)
                return 0
            server = await self.loop.create_server(
                factory, settings.host, settings.port, reuse_address=True
            )
        except OSError as exc:
            raise OSError(f"cannot listen on {settings.address}: {exc.strerror or exc}") from exc
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def backend(self) -> Backend:
        conn = self._backend
        if conn is None or conn.closed or conn.going_away:
            if conn is not None and not conn.streams and conn.transport is not None:
                conn.transport.close()
            conn = self._backend = Backend(self.flusher)
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return conn

    async def _connect(self, conn: Backend) -> None:
        try:
            await self.loop.create_unix_connection(lambda: conn, self.internal_path)
        except OSError as exc:
            log.warning("cannot reach the server behind the front: %s", exc)
            conn.lost(exc)
            self.flusher.flush()

    async def drain(self, grace: float) -> None:
        """Stops accepting, tells clients (GOAWAY), lets calls in flight finish for up
        to ``grace`` seconds, then closes every connection."""
        self.draining = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.write(f.goaway(conn.last_stream, f.NO_ERROR))
        self.flusher.flush()
        deadline = self.loop.time() + grace
        # Polled, as the relay's drain is: a shutdown can afford it, the hot path could
        # not afford a notification per finished stream.
        while (self.calls or any(c.streams for c in self.connections)) and (
            self.loop.time() < deadline
        ):
            await asyncio.sleep(0.02)
        for call in list(self.calls):
            if isinstance(call, LocalCall):
                call._answer_error(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            else:
                call.client_reset()
        self.flusher.flush()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for task in self._tasks:
            task.cancel()
        if self._backend is not None and self._backend.transport is not None:
            self._backend.transport.close()
        for server in self._servers:
            await server.wait_closed()


async def start_fronted_server(
    settings: ServerSettings,
    services: Sequence[Service],
    hot: Iterable[HotMethod],
    *,
    serving: bool = True,
) -> Serving:
    """``services`` on a grpc.aio server on a private Unix socket (every method, hot
    ones too: a call that reaches it directly still works), with the front on the
    address ``settings`` name. The returned Serving drains the front first; ``serving``
    as for :func:`start_server` (the health the grpc.aio server answers)."""
    private = PrivateSocket.create("meshserve-front-")
    internal = dataclasses.replace(settings, host=private.address, port=0)
    try:
        started = await start_server(internal, services, serving=serving)
    except BaseException:
        private.remove()
        raise

    async def remove_folder() -> None:
        private.remove()

    started.on_drain(remove_folder)
    checks: list[Check] = []
    if settings.sidecar_secret is not None:
        checks.append(SecretCheck(settings.sidecar_secret))
    front = H2Front(
        hot, started.address, max_message_bytes=settings.max_message_bytes, checks=checks
    )
    try:
        port = await front.start(settings)
    except OSError:
        await started.drain(0)
        raise
    started.before_stop(front.drain)
    started.port, started.settings = port, settings
    return started
