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
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from mesh.proxy import frames as f
from mesh.proxy.client_connection import ClientConnection
from mesh.proxy.connection import MAX_STREAMS, Connection
from mesh.proxy.flusher import Flusher
from mesh.proxy.grpc_status import error_headers
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import Side
from mesh.routing import callpolicy as policy
from mesh.routing.callcheck import PREFIX, Rejection, check_compressed, check_end, check_headers
from mesh.server.app import ServerSettings, Service, Serving, start_server
from mesh.server.call_context import CallContext
from mesh.server.interceptor import status_for
from mesh.server.passthrough import Passthrough
from mesh.server.private import PrivateSocket
from mesh.server.sidecar_secret import SecretCheck

log = logging.getLogger(__name__)

#: Called before a hot method's handler, like a GuardInterceptor check: raises a MeshError
#: to refuse the call (mesh.server.sidecar_secret.SecretCheck).
Check = Callable[[str, Any], Awaitable[None]]
#: What the front offers for request compression (gRPC's names).
ACCEPT_ENCODING = b"identity,deflate,gzip"
_RESPONSE_HEADERS: list[Header] = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", ACCEPT_ENCODING),
]
_OK: list[Header] = [(b"grpc-status", b"0")]
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


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


class _Ended(Exception):
    """The call was answered while its request was read (a rejected message)."""


class LocalCall:
    """One call to a hot method, served on the front's own connection."""

    __slots__ = (
        "_flag",
        "_head",
        "_left",
        "_parts",
        "_timer",
        "context",
        "done",
        "down",
        "encoding",
        "front",
        "headers",
        "messages",
        "method",
        "queue",
        "request_ended",
        "started",
        "task",
    )

    def __init__(
        self, front: H2Front, down: Side, method: HotMethod, headers: list[Header], end: bool
    ) -> None:
        self.front = front
        self.down = down
        down.exchange = self
        self.method = method
        self.headers = headers
        self.request_ended = end
        self.done = False
        self.started = False
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: The message being read: its prefix so far, its flag, the body bytes still to
        #: come and the body's pieces (joined once, when it is whole: one copy).
        self._head = b""
        self._flag = 0
        self._left = 0
        self._parts: list[bytes] = []
        self.messages: list[bytes] = []
        self.queue: asyncio.Queue[Any] | None = None
        front.calls.add(self)
        loop = front.loop
        rejected = check_headers(headers)
        self.encoding = None
        timeout = None
        for name, value in headers:
            if name == b"grpc-encoding":
                self.encoding = value
            elif name == b"grpc-timeout":
                timeout = policy.parse_timeout(value)
                if timeout is None:
                    rejected = rejected or Rejection(
                        grpc.StatusCode.INTERNAL, f"bad grpc-timeout {value.decode('latin-1')!r}"
                    )
        if rejected is not None:
            self._answer_error(rejected.code, rejected.message, rejected.headers)
            return
        deadline = None if timeout is None else loop.time() + timeout
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._expired)
        self.context = CallContext(headers, deadline, loop)
        if method.streaming:
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run_stream())
        if end:
            self._request_end()

    # -- the request -----------------------------------------------------------------------

    def request_data(self, payload: bytes, flow: int, end_stream: bool) -> None:
        # Read into the call at once: its window goes back now, and the message size
        # limit (not the window) bounds what a call holds.
        self.down.credit_back(flow)
        if self.done:
            return
        self.request_ended = end_stream
        try:
            if payload:
                self._feed(payload)
        except _Ended:
            return
        if end_stream:
            self._request_end()

    def request_trailers(self, end_stream: bool) -> None:
        self.request_data(b"", 0, end_stream)

    def _feed(self, data: bytes) -> None:
        if not self._left and not self._head and len(data) >= PREFIX:
            # The common case: one whole message in one DATA frame, read without copying.
            size = int.from_bytes(data[1:5], "big")
            if len(data) == PREFIX + size:
                self._message(data[0], size, data[PREFIX:])
                return
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                step = min(self._left, end - pos)
                self._parts.append(data if step == end else data[pos : pos + step])
                self._left -= step
                pos += step
                if not self._left:
                    body, self._parts = b"".join(self._parts), []
                    self._message(self._flag, len(body), body)
                continue
            head = self._head + data[pos : pos + PREFIX - len(self._head)]
            pos += len(head) - len(self._head)
            if len(head) < PREFIX:
                self._head = head
                return
            self._head = b""
            size = int.from_bytes(head[1:5], "big")
            # Refused at its prefix: an oversized message is never buffered.
            self._check_size(size)
            if size:
                self._flag, self._left = head[0], size
            else:
                self._message(head[0], 0, b"")

    def _check_size(self, size: int) -> None:
        limit = self.front.max_message_bytes
        if size > limit:
            self._answer_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({size} vs. {limit})",
            )
            raise _Ended

    def _message(self, flag: int, size: int, body: bytes) -> None:
        self._check_size(size)
        if flag & 1:
            rejected = check_compressed(self.encoding)
            if rejected is not None:
                self._answer_error(rejected.code, rejected.message, rejected.headers)
                raise _Ended
            body = self._decompress(body)
        if self.queue is not None:
            self.queue.put_nowait(self.method.parse(body))
        else:
            self.messages.append(body)

    def _decompress(self, body: bytes) -> bytes:
        assert self.encoding is not None  # check_compressed passed
        limit = self.front.max_message_bytes
        try:
            inflater = zlib.decompressobj(_WBITS[self.encoding])
            data = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            self._answer_error(
                grpc.StatusCode.INTERNAL,
                f"cannot decompress a {self.encoding.decode('latin-1')} message: {exc}",
            )
            raise _Ended from None
        if len(data) > limit:
            self._answer_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max (over {limit} bytes decompressed)",
            )
            raise _Ended
        return data

    def _request_end(self) -> None:
        if self.done:
            return
        if self._left or self._head:
            self._answer_error(grpc.StatusCode.INTERNAL, "the request ended inside a message")
            return
        if self.queue is not None:
            self.queue.put_nowait(_END)
            return
        rejected = check_end(len(self.messages), client_streaming=False)
        if rejected is None and len(self.messages) > 1:
            rejected = Rejection(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{self.method.path} takes one request message, got {len(self.messages)}",
            )
        if rejected is not None:
            self._answer_error(rejected.code, rejected.message)
            return
        # Only the task holds the message from here: it is freed when the call ends.
        body, self.messages = self.messages[0], []
        self.task = self.front.loop.create_task(self._run_unary(body))

    # -- running the behaviour ---------------------------------------------------------------

    async def _check(self) -> None:
        for check in self.front.checks:
            await check(self.method.path, self.context)

    async def _run_unary(self, body: bytes) -> None:
        method = self.method
        try:
            await self._check()
            response = await method.behaviour(method.parse(body), self.context)
            data = method.serialize(response)
        except asyncio.CancelledError:
            return  # answered by whoever cancelled (deadline, reset, drain)
        except Exception as exc:
            self._fail(exc)
            return
        if self.done:
            return
        if self._too_large(data):
            return
        self.started = True
        down = self.down
        down.send_headers(_RESPONSE_HEADERS, end_stream=False)
        self._send_message(data)
        self._end_ok()

    async def _run_stream(self) -> None:
        method = self.method
        try:
            await self._check()
            responses: AsyncIterator[Any] = method.behaviour(self._requests(), self.context)
            async for response in responses:
                data = method.serialize(response)
                if self.done or self._too_large(data):
                    return
                if not self.started:
                    self.started = True
                    self.down.send_headers(_RESPONSE_HEADERS, end_stream=False)
                self._send_message(data)
        except asyncio.CancelledError:
            return
        except Exception as exc:
            self._fail(exc)
            return
        if not self.done:
            if not self.started:
                self.started = True
                self.down.send_headers(_RESPONSE_HEADERS, end_stream=False)
            self._end_ok()

    async def _requests(self) -> AsyncIterator[Any]:
        queue = self.queue
        assert queue is not None
        while (item := await queue.get()) is not _END:
            yield item

    def _too_large(self, data: bytes) -> bool:
        limit = self.front.max_message_bytes
        if len(data) <= limit:
            return False
        self._answer_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Sent message larger than max ({len(data)} vs. {limit})",
        )
        return True

    def _send_message(self, data: bytes) -> None:
        down = self.down
        size = len(data)
        framed = b"\x00" + size.to_bytes(4, "big") + data
        step = down.conn.peer_max_frame
        if len(framed) <= step:
            down.send_data(framed, end_stream=False)
            return
        # Frames are views of the one framed message, not copies of its pieces.
        view = memoryview(framed)
        for start in range(0, len(framed), step):
            down.send_data(view[start : start + step], end_stream=False)  # type: ignore[arg-type]

    def _end_ok(self) -> None:
        trailers = self.context.trailers
        block = _OK
        if trailers:
            block = [*_OK, *((k.encode("latin-1"), v.encode("latin-1")) for k, v in trailers)]
        self.down.send_headers(block, end_stream=True)
        self._finish()

    def _fail(self, exc: BaseException) -> None:
        if self.done:
            return
        code, message, trailers = status_for(exc)
        extra = tuple(
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in (*self.context.trailers, *trailers)
        )
        self._answer_error(code, message, extra)

    # -- ending ------------------------------------------------------------------------------

    def _answer_error(
        self, code: grpc.StatusCode, message: str, extra: Iterable[Header] = ()
    ) -> None:
        if self.done:
            return
        headers = error_headers(code, message, trailers_only=not self.started)
        headers.extend(extra)
        self.down.send_headers(headers, end_stream=True)
        self._finish(cancel=True)

    def _expired(self) -> None:
        self._timer = None
        self._answer_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def client_reset(self) -> None:
        """The client cancelled (RST_STREAM) or its connection went away."""
        if not self.done:
            self._finish(cancel=True)

    def _finish(self, *, cancel: bool = False) -> None:
        if self.done:
            return
        self.done = True
        # The call and its stream refer to each other: what they hold is dropped now,
        # not when the cycle collector next runs (a large message would stay till then).
        self.messages, self._parts = [], []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self.task
        if cancel and task is not None and not task.done() and task is not _current_task():
            task.cancel()
        # A client still sending is told to stop once the response is out (RFC 9113 §8.1).
        self.down.finish(reset=not self.request_ended)
        self.front.calls.discard(self)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


_END = object()


class FrontConnection(Connection):
    """A client's connection to the front: each new stream is a LocalCall or a Passthrough."""

    client_side = False

    def __init__(self, front: H2Front) -> None:
        super().__init__(front.flusher)
        self.front = front
        self.last_stream = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.front.connections.add(self)

    def on_headers(self, stream_id: int, headers: list[Header], end_stream: bool) -> None:
        side = self.streams.get(stream_id)
        if side is not None:
            side.exchange.request_trailers(end_stream)
            return
        if stream_id % 2 == 0:
            raise f.ProtocolError(f"client opened even stream {stream_id}")
        if stream_id <= self.last_stream:
            return  # late trailers of a stream already finished
        self.last_stream = stream_id
        front = self.front
        if front.draining or len(self.streams) >= MAX_STREAMS:
            self.write(f.rst_stream(stream_id, f.REFUSED_STREAM))
            return
        side = Side(self, stream_id, None)
        self.streams[stream_id] = side
        path = b""
        for name, value in headers:
            if name == b":path":
                path = value
                break
        method = front.hot.get(path)
        if method is not None:
            LocalCall(front, side, method, headers, end_stream)
        else:
            Passthrough(front, side, headers, end_stream)

    def on_data(self, side: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        side.exchange.request_data(payload, flow, end_stream)

    def on_reset(self, side: Side, code: int) -> None:
        side.exchange.client_reset()

    def on_oversized_headers(self, stream_id: int, end_stream: bool, detail: str) -> None:
        side = self.streams.get(stream_id)
        if side is not None:
            side.reset(f.ENHANCE_YOUR_CALM)
            side.exchange.client_reset()
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            return
        self.last_stream = stream_id
        block = self.encoder.encode(
            error_headers(grpc.StatusCode.RESOURCE_EXHAUSTED, detail, trailers_only=True)
        )
        self.write(f.headers(stream_id, block, end_stream=True, max_size=self.peer_max_frame))
        if not end_stream:
            self.write(f.rst_stream(stream_id, f.NO_ERROR))

    def lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        for side in list(self.streams.values()):
            side.close()
            side.exchange.client_reset()


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
