"""One call to a hot method, served on the worker's HTTP/2 front itself.

Why: grpc.aio's own call machinery was the floor under the inference worker's request
path (issue 17), so the front (mesh/server/h2_front.py) serves a few named methods on
the relay's HTTP/2 engine. A :class:`LocalCall` is one such call: it reads the request
from the stream's DATA as it arrives (one copy at most, the window returned at once),
hands the decoded request to the same servicer method grpc.aio would call, with a
:class:`~mesh.server.call_context.CallContext`, and writes the response, its trailers or
an error status itself.

What a gRPC server does for a call it does too: deadlines (``grpc-timeout``:
DEADLINE_EXCEEDED, handler cancelled), cancellation (RST_STREAM cancels the handler),
compressed requests (gzip, deflate), the message size limit (RESOURCE_EXHAUSTED, refused
at a message's prefix), malformed calls (mesh/routing/callcheck.py), the door checks and
error mapping (mesh.server.interceptor.status_for).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from mesh.proxy.grpc_status import error_headers
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import Side
from mesh.routing import callpolicy as policy
from mesh.routing.callcheck import PREFIX, Rejection, check_compressed, check_end, check_headers
from mesh.server.call_context import CallContext
from mesh.server.interceptor import status_for

if TYPE_CHECKING:
    from mesh.server.h2_front import H2Front, HotMethod

#: What the front offers for request compression (gRPC's names).
ACCEPT_ENCODING = b"identity,deflate,gzip"
_RESPONSE_HEADERS: list[Header] = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", ACCEPT_ENCODING),
]
_OK: list[Header] = [(b"grpc-status", b"0")]
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


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
