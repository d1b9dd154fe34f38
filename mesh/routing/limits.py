"""How long a proxy keeps what is idle, and how much one client may hold.

Timeouts follow Envoy's HTTP connection manager (names and meaning; 0 disables one):

- ``request_headers_timeout`` (Envoy: off by default, 10 s in its edge best practices):
  a new connection must deliver a complete request header block within it, and a
  header block split over CONTINUATION frames must complete within it;
- ``stream_idle_timeout`` (Envoy's default 5 min): a stream with no frames either way
  for this long is ended (DEADLINE_EXCEEDED);
- ``idle_timeout`` (Envoy's default 1 h): a connection with no streams for this long
  is closed (GOAWAY, then close);
- ``max_connection_duration`` (Envoy: off by default): a connection this old is told
  GOAWAY (graceful: streams in flight finish) and closed once its last stream ends.

The route timeout (VirtualService ``timeout``) is not here: it is per route. Unlike
Envoy's, whose timer starts when the request is complete, the proxy counts it from the
call's first byte, so a client that never sends its message is answered at the route
timeout rather than held until the stream idle timeout.

Per-source limits play the part of Envoy's connection limits and overload manager,
keyed on the client's address so that one client's abuse costs that client: connections
and open streams per source, open streams in all, a cool-off during which a source
whose connection was closed for abuse (rapid reset, floods) is refused, and a source's
share of a destination's ``http2MaxRequests``: without it, one client holding streams
open (a message sent, END_STREAM never) filled the destination's circuit breaker, and
every other client was shed until the route timeout, again and again.

:class:`SourceLimiter` is pure bookkeeping with an injected clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class RelayLimits:
    """The relay's timeouts (seconds, 0: off) and per-source limits (0: unlimited)."""

    request_headers_timeout: float = 10.0
    stream_idle_timeout: float = 300.0
    idle_timeout: float = 3600.0
    max_connection_duration: float = 0.0
    max_connections_per_source: int = 128
    #: Two full connections' worth (each allows 4096 concurrent streams).
    max_streams_per_source: int = 8192
    max_streams: int = 65536
    abuse_cool_off: float = 30.0
    #: The most of a destination's ``http2MaxRequests`` one source may hold once that
    #: destination is that full (rounded up; 0: no cap): the rest stays for the others.
    #: Off in a sidecar, whose callers are one worker or the gateway's few connections.
    max_source_share: float = 0.75

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{field.name} must be a number >= 0, got {value!r}")
        if self.max_source_share > 1:
            raise ValueError(
                f"max_source_share is a fraction of http2MaxRequests (0 to 1), "
                f"got {self.max_source_share!r}"
            )

    @property
    def tick(self) -> float:
        """How often the relay checks its timers: a quarter of the shortest timeout, so
        one fires at most 25% late, and at most once a second (cheap: one pass over the
        connections and calls, no timer per stream)."""
        timeouts = [
            t
            for t in (
                self.request_headers_timeout,
                self.stream_idle_timeout,
                self.idle_timeout,
                self.max_connection_duration,
            )
            if t > 0
        ]
        return min([1.0, *(t / 4 for t in timeouts)])


#: The source of a client with no IP address (a Unix-socket peer).
LOCAL_SOURCE = "local"


def source_of(peername: object) -> str:
    """What per-source limits count a connection under: its peer's IP address, or
    ``LOCAL_SOURCE`` (``peername`` as ``get_extra_info("peername")`` gives it)."""
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return LOCAL_SOURCE


def _drop_one(counts: dict[str, int], source: str) -> None:
    """One fewer for ``source``; a source at none leaves the map (it must not grow with
    every address ever seen)."""
    count = counts.get(source, 0) - 1
    if count > 0:
        counts[source] = count
    else:
        counts.pop(source, None)


class SourceLimiter:
    """Counts connections and open streams per client address against :class:`RelayLimits`,
    and remembers sources in cool-off. Each ``admit_*`` returns None (admitted, counted)
    or why not; each admitted one must be released once."""

    def __init__(self, limits: RelayLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        self.connections: dict[str, int] = {}
        #: TLS handshakes in progress by source (a connection counts in ``connections``
        #: once its handshake is done, and here until then).
        self.handshakes: dict[str, int] = {}
        self.streams: dict[str, int] = {}
        self.total_streams = 0
        #: Source → end of its cool-off.
        self._cooling: dict[str, float] = {}
        #: Refusals so far, by reason (for tests and the memory check).
        self.refused: dict[str, int] = {}

    def _refuse(self, reason: str, message: str) -> str:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return message

    def cooling_off(self, source: str) -> float:
        """Seconds left of ``source``'s cool-off (0: none)."""
        until = self._cooling.get(source)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._cooling[source]
            return 0.0
        return left

    def admit_connection(self, source: str) -> str | None:
        left = self.cooling_off(source)
        if left > 0:
            return self._refuse(
                "cool_off", f"cooling off for {left:.0f}s after abuse from {source}"
            )
        limit = self.limits.max_connections_per_source
        count = self.connections.get(source, 0)
        if limit and count >= limit:
            return self._refuse("connections", f"{source} has {count} connections open")
        self.connections[source] = count + 1
        return None

    def admit_handshake(self, source: str) -> str | None:
        """A TLS connection before its handshake ends: at most ``max_connections_per_source``
        of them per source. Uncounted, a client that opened connections and stalled their
        handshakes held a socket and the TLS layer's buffers (~300 KB) for each, without
        limit, until the handshake timed out."""
        limit = self.limits.max_connections_per_source
        count = self.handshakes.get(source, 0)
        if limit and count >= limit:
            return self._refuse("handshakes", f"{source} has {count} TLS handshakes in progress")
        self.handshakes[source] = count + 1
        return None

    def release_handshake(self, source: str) -> None:
        _drop_one(self.handshakes, source)

    def release_connection(self, source: str) -> None:
        _drop_one(self.connections, source)

    def admit_stream(self, source: str) -> str | None:
        limits = self.limits
        if limits.max_streams and self.total_streams >= limits.max_streams:
            return self._refuse("streams", f"the gateway has {self.total_streams} streams open")
        count = self.streams.get(source, 0)
        if limits.max_streams_per_source and count >= limits.max_streams_per_source:
            return self._refuse("source_streams", f"{source} has {count} streams open")
        self.streams[source] = count + 1
        self.total_streams += 1
        return None

    def release_stream(self, source: str) -> None:
        self.total_streams -= 1
        _drop_one(self.streams, source)

    def over_share(self, source: str, limit: int, in_flight: int) -> str | None:
        """Why ``source`` may not add a call to a destination whose ``http2MaxRequests`` is
        ``limit`` with ``in_flight`` calls, or None. Its streams here stand for its calls
        there (this call's own stream is counted already, so it holds one fewer): a
        source at ``max_source_share`` of the limit is refused only while the destination
        is that full too, so a client alone may still use it all but for the share's
        headroom, and a client holding streams elsewhere is not refused for them."""
        share = self.limits.max_source_share
        if not share:
            return None
        cap = math.ceil(limit * share)
        held = self.streams.get(source, 0) - 1
        if in_flight < cap or held < cap:
            return None
        return self._refuse(
            "source_share",
            f"{source} holds {held} calls: one client may hold at most {cap} of a "
            f"destination's http2MaxRequests {limit} (max_source_share {share:g})",
        )

    def penalize(self, source: str) -> None:
        """``source`` was closed for abuse: refuse it for the cool-off period."""
        if self.limits.abuse_cool_off <= 0:
            return
        now = self._clock()
        if len(self._cooling) > 4096:  # expired entries go before the map can grow
            self._cooling = {s: t for s, t in self._cooling.items() if t > now}
        self._cooling[source] = now + self.limits.abuse_cool_off
