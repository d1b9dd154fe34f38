"""What a hot method served on the worker's HTTP/2 front sees of its call.

Why: the front (mesh/server/h2_front.py) hands a decoded request to the same servicer
method grpc.aio would call, so that method needs a context offering what it uses of
grpc.aio's ServicerContext: the caller's metadata (as grpc gives it), the time left
before the deadline and trailing metadata to send. This is that context and no more;
one is made per call, so it is small and reads the metadata only when asked.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence

from mesh.proxy.hpack_codec import Header

#: Request headers that are transport, not the caller's metadata (grpc.aio leaves them
#: out of ``invocation_metadata`` too, but for user-agent).
_NOT_METADATA = frozenset(
    {b"content-type", b"te", b"grpc-encoding", b"grpc-accept-encoding", b"grpc-timeout"}
)


class CallContext:
    """What the servicer's hot methods use of grpc.aio's ServicerContext."""

    __slots__ = ("_deadline", "_headers", "_loop", "_metadata", "trailers")

    def __init__(
        self, headers: list[Header], deadline: float | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._headers = headers
        self._deadline = deadline
        self._loop = loop
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = None
        self.trailers: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """As grpc gives it: text values as str, ``-bin`` values base64-decoded bytes."""
        if self._metadata is None:
            out: list[tuple[str, str | bytes]] = []
            for name, value in self._headers:
                if name[:1] == b":" or name in _NOT_METADATA:
                    continue
                key = name.decode("latin-1")
                if name.endswith(b"-bin"):
                    out.append((key, base64.b64decode(value + b"=" * (-len(value) % 4))))
                else:
                    out.append((key, value.decode("latin-1")))
            self._metadata = tuple(out)
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - self._loop.time(), 0.0)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailers = tuple(metadata)
