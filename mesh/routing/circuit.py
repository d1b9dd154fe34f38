"""Envoy's circuit breakers for one cluster, as DestinationRule ``connectionPool`` sets them.

Pure counters and decisions; the relay (mesh/proxy/relay.py, pool.py and the layers of exchange.py) is their one
caller, in every mode that routes (the gateway, a sidecar's outbound). What each limit
means, for HTTP/2 upstreams as Envoy applies them:

- ``tcp.maxConnections`` (max_connections): connections to all the cluster's hosts. Past
  it no new connection is opened; a call waits, pending, for stream capacity on one that
  is open. As in Envoy's pool, a host with no connection at all still gets one (its calls
  could otherwise never be served); that is counted as an overflow all the same.
- ``http.http1MaxPendingRequests`` (max_pending_requests): calls waiting for a connection
  (one being opened, or stream capacity on one) at once. A call that would be one more
  is shed at once: UNAVAILABLE with ``x-envoy-overloaded`` (Envoy's 503 overflow).
- ``http.maxRequestsPerConnection``: streams one connection carries; then it is drained
  (no new streams, its calls finish, it closes) and a new one takes the next calls.
- ``http.maxRetries`` (max_retries): retries outstanding to the cluster at once, from the
  moment one is decided until that attempt ends. A retry past it is not attempted: the
  call ends with the error the retry would have answered, and the overflow is counted.
- ``http.http2MaxRequests`` (max_requests): calls in flight (callpolicy.over_request_limit).

Counters live per cluster (host/subset) for the relay's life, across config reloads, and
each limit is read from the cluster's current policy when it is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.config.destination_rule import UNLIMITED, ConnectionPool

#: Overflow kinds, as Envoy's cluster stats name them (upstream_cx_overflow,
#: upstream_rq_pending_overflow, upstream_rq_retry_overflow, and max_requests').
CONNECTIONS = "connections"
PENDING = "pending"
RETRIES = "retries"
REQUESTS = "requests"
KINDS = (CONNECTIONS, PENDING, RETRIES, REQUESTS)
#: The field each kind's limit is configured by, for messages and docs.
FIELDS = {
    CONNECTIONS: "connectionPool.tcp.maxConnections",
    PENDING: "connectionPool.http.http1MaxPendingRequests",
    RETRIES: "connectionPool.http.maxRetries",
    REQUESTS: "connectionPool.http.http2MaxRequests",
}


def stream_room(pool: ConnectionPool, peer_max_streams: int, open_streams: int, opened: int) -> int:
    """How many more streams a connection may take now: its peer's
    SETTINGS_MAX_CONCURRENT_STREAMS less those open, and what is left of
    ``maxRequestsPerConnection`` after the ``opened`` it has carried."""
    room = peer_max_streams - open_streams
    if pool.max_requests_per_connection < UNLIMITED:
        room = min(room, pool.max_requests_per_connection - opened)
    return max(room, 0)


def spent(pool: ConnectionPool, opened: int) -> bool:
    """Whether a connection has carried its ``maxRequestsPerConnection``: it is drained."""
    return (
        pool.max_requests_per_connection < UNLIMITED and opened >= pool.max_requests_per_connection
    )


@dataclass
class CircuitBreakers:
    """One cluster's resource counters and overflow counts (Envoy's ResourceManager)."""

    #: Connections open or being opened to the cluster's hosts.
    connections: int = 0
    #: Calls waiting for a connection or stream capacity.
    pending: int = 0
    #: Retries decided and not yet ended.
    retries: int = 0
    #: Overflows by kind (KINDS): what was refused, or (connections) allowed past the limit.
    overflows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def open_connection(
        self, pool: ConnectionPool, *, host_has_connection: bool, count: bool = True
    ) -> bool:
        """Whether a new connection may be opened (then it is counted): under
        ``maxConnections``, or the host has none (Envoy's pool never leaves a host
        without one; past the limit that still counts as an overflow). ``count``
        False: a retry of the same question (a queued call woken) is not another
        overflow."""
        if self.connections < pool.max_connections:
            self.connections += 1
            return True
        if count:
            self.overflows[CONNECTIONS] += 1
        if host_has_connection:
            return False
        self.connections += 1
        return True

    def close_connection(self) -> None:
        self.connections = max(self.connections - 1, 0)

    def add_pending(self, pool: ConnectionPool) -> bool:
        """A call begins to wait; False (counted): it is one too many and is shed."""
        if self.pending >= pool.max_pending_requests:
            self.overflows[PENDING] += 1
            return False
        self.pending += 1
        return True

    def remove_pending(self) -> None:
        self.pending = max(self.pending - 1, 0)

    def start_retry(self, pool: ConnectionPool) -> bool:
        """A retry is decided; False (counted): ``maxRetries`` are outstanding already."""
        if self.retries >= pool.max_retries:
            self.overflows[RETRIES] += 1
            return False
        self.retries += 1
        return True

    def end_retry(self) -> None:
        self.retries = max(self.retries - 1, 0)

    def shed_request(self) -> None:
        """``http2MaxRequests`` shed a call (callpolicy.over_request_limit)."""
        self.overflows[REQUESTS] += 1


def limits_text(pool: ConnectionPool) -> str:
    """The limits a cluster sets, for ``route explain`` and logs ("" when none is)."""
    parts = [
        f"{name}={value}"
        for name, value in (
            ("maxConnections", pool.max_connections),
            ("http1MaxPendingRequests", pool.max_pending_requests),
            ("http2MaxRequests", pool.http2_max_requests),
            ("maxRequestsPerConnection", pool.max_requests_per_connection),
            ("maxRetries", pool.max_retries),
        )
        if value < UNLIMITED
    ]
    return ", ".join(parts)
