"""The relay's upstream connections: one pool per host per cluster, as Envoy keeps them.

A routed call takes a connection from its cluster's pool for the endpoint's address,
where DestinationRule ``connectionPool`` applies (the limits are mesh/routing/circuit.py's
pure counters; this module is their thin caller): connections per cluster
(``tcp.maxConnections``), calls waiting for a connection or for stream capacity on one
(``http.http1MaxPendingRequests``: queued here, first come first served, or shed), and
streams per connection (``http.maxRequestsPerConnection``: a spent connection is drained).
Calls outside any cluster (the gateway's own server, a sidecar's worker, mirrors) share
one connection per address with no limit but the peer's stream limit.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from mesh.balance.cluster import Cluster
from mesh.config.client_tls import ISTIO_MUTUAL, ClientTls
from mesh.config.destination_rule import ConnectionPool
from mesh.proxy.client_connection import ClientConnection
from mesh.proxy.stream import Side
from mesh.proxy.upstream_tls import UpstreamTls
from mesh.routing import circuit
from mesh.routing.circuit import CircuitBreakers

if TYPE_CHECKING:
    from mesh.proxy.exchange import Exchange
    from mesh.proxy.relay import Relay

log = logging.getLogger(__name__)


class Upstream(ClientConnection):
    """The relay's connection to one upstream address; streams of many exchanges share it."""

    def __init__(self, relay: Relay, address: str, host: HostPool | None = None) -> None:
        super().__init__(relay.flusher)
        self.relay = relay
        self.address = address
        #: The cluster's pool for this address (None: a call outside any cluster's
        #: limits: the gateway's own server, a sidecar's worker, a mirror).
        self.host = host
        #: Streams this connection has carried (maxRequestsPerConnection).
        self.opened = 0
        #: Counted in its cluster's connections until lost.
        self.counted = host is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.host is not None:
            # Calls that waited for this connection are pending no longer.
            for side in list(self.streams.values()):
                side.exchange.upstream_connected()

    def on_oversized_headers(self, stream_id: int, end_stream: bool, detail: str) -> None:
        if stream_id in self.streams:
            log.warning("upstream %s: %s", self.address, detail)
        super().on_oversized_headers(stream_id, end_stream, detail)

    def stream_closed(self, side: Side) -> None:
        super().stream_closed(side)
        host = self.host
        if host is not None and host.waiting:
            self.relay.pool.wake(host)

    def lost(self, exc: Exception | None) -> None:
        pool = self.relay.pool
        pool.open.discard(self)
        host = self.host
        if host is not None:
            if self in host.conns:
                host.conns.remove(self)
            if self.counted:
                self.counted = False
                host.live -= 1
                host.breakers.close_connection()
                pool.wake_cluster(host.cluster)
        super().lost(exc)

    def connect_failed(self, exc: Exception) -> None:
        self.lost(exc)
        self.flusher.flush()


#: What :meth:`UpstreamPool.acquire` answers when a call is shed (an overflow).
SHED = "shed"


class HostPool:
    """One cluster's connections to one address (Envoy: a host's pool in a cluster), and
    the calls queued for room on them while the cluster is at ``maxConnections``."""

    __slots__ = (
        "address",
        "breakers",
        "cluster",
        "conns",
        "limits",
        "live",
        "timeout",
        "tls",
        "waiting",
        "woken",
    )

    def __init__(
        self,
        cluster: tuple[str, str],
        address: str,
        tls: ClientTls,
        breakers: CircuitBreakers,
    ) -> None:
        self.cluster = cluster
        self.address = address
        self.tls = tls
        self.breakers = breakers
        #: Connections that take new streams (not drained, not lost).
        self.conns: list[Upstream] = []
        #: Connections not lost, drained ones included: a host with one is not without.
        self.live = 0
        #: Calls waiting for stream capacity, first come first served.
        self.waiting: deque[Exchange] = deque()
        #: The cluster's pool settings and connect timeout as of the last call.
        self.limits = ConnectionPool()
        self.timeout: float | None = None
        self.woken = False


class UpstreamPool:
    """HTTP/2 connections to upstream addresses, opened on first use and replaced when
    they close, go away or reach their stream limit; HTTP/2 multiplexes many calls on each.

    A routed call takes its connection from its cluster's pool for the address (Envoy
    keeps a pool per host per cluster), where DestinationRule ``connectionPool`` applies
    (mesh/routing/circuit.py): connections per cluster, pending calls, streams per
    connection. Other calls (the gateway's own server, a sidecar's worker, mirrors) share
    one unlimited connection per address.
    """

    def __init__(self, relay: Relay, ssl_context: Callable[[], ssl.SSLContext] | None) -> None:
        self.relay = relay
        self._tls = UpstreamTls(ssl_context)
        #: Outside any cluster: by address and TLS setting (two DestinationRules may
        #: secure one address apart).
        self._conns: dict[tuple[str, ClientTls], Upstream] = {}
        #: A cluster's pool per address: by (host, subset), address and TLS setting.
        self._hosts: dict[tuple[tuple[str, str], str, ClientTls], HostPool] = {}
        #: Each cluster's circuit breakers, by (host, subset), for the relay's life.
        self.breakers: dict[tuple[str, str], CircuitBreakers] = {}
        #: Every connection not yet lost, retired ones included (closed on shutdown).
        self.open: set[Upstream] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def get(
        self, address: str, connect_timeout: float | None = None, tls: ClientTls = ISTIO_MUTUAL
    ) -> Upstream:
        """The connection to ``address`` secured as ``tls`` says (DestinationRule
        ``trafficPolicy.tls``; the relay's own context for ISTIO_MUTUAL), outside any
        cluster's limits; a new one fails (as a connect failure) if it is not up within
        ``connect_timeout`` seconds (connectionPool.tcp.connectTimeout)."""
        conn = self._conns.get((address, tls))
        if (
            conn is None
            or conn.closed
            or conn.going_away
            # At the peer's SETTINGS_MAX_CONCURRENT_STREAMS a new stream would be refused:
            # another connection takes new calls (as Envoy's pool does), this one finishes.
            or len(conn.streams) >= conn.peer_max_streams
        ):
            if conn is not None:
                self._retire(conn)
            conn = self._conns[(address, tls)] = self._open(address, connect_timeout, tls, None)
        return conn

    def breakers_for(self, cluster: Cluster) -> CircuitBreakers:
        key = (cluster.members.host, cluster.members.subset)
        found = self.breakers.get(key)
        if found is None:
            found = self.breakers[key] = CircuitBreakers()
        return found

    def acquire(self, exchange: Exchange, address: str, cluster: Cluster) -> Upstream | str | None:
        """A connection of ``cluster``'s pool for ``address`` with room for one more
        stream, for ``exchange``'s attempt. None: none has room and no connection may be
        opened: the call is queued (pending) and placed later (``Exchange.place``).
        :data:`SHED`: the call would be one pending call too many (counted). While the
        connection returned is still being opened the call is pending on it
        (``Exchange.upstream_connected`` ends that)."""
        key = (cluster.members.host, cluster.members.subset)
        host = self._hosts.get((key, address, cluster.tls))
        if host is None:
            host = self._hosts[(key, address, cluster.tls)] = HostPool(
                key, address, cluster.tls, self.breakers_for(cluster)
            )
        limits = host.limits = cluster.policy.connection_pool
        host.timeout = limits.connect_timeout
        breakers = host.breakers
        if host.waiting:
            # Calls queued first are placed first; room may have come without a stream
            # ending (the peer raised its stream limit).
            self.wake(host)
        conn = None if host.waiting else self._with_room(host)
        if conn is None and not host.waiting:
            overflows = breakers.overflows[circuit.CONNECTIONS]
            if breakers.open_connection(limits, host_has_connection=host.live > 0):
                conn = self._new(host)
            if breakers.overflows[circuit.CONNECTIONS] != overflows:
                self.relay.overflowed(exchange, circuit.CONNECTIONS)
        if conn is None or not conn.connected:
            if not breakers.add_pending(limits):
                return SHED
            exchange.pending = breakers
            if conn is None:
                exchange.queue = host
                host.waiting.append(exchange)
                return None
        self._take(host, conn)
        return conn

    def adopt(self, conn: Upstream, cluster: Cluster) -> None:
        """Makes ``conn`` (connected by its owner: a benchmark's in-memory one) one of
        ``cluster``'s connections to its address."""
        key = (cluster.members.host, cluster.members.subset)
        host = self._hosts.get((key, conn.address, cluster.tls))
        if host is None:
            host = self._hosts[(key, conn.address, cluster.tls)] = HostPool(
                key, conn.address, cluster.tls, self.breakers_for(cluster)
            )
        host.limits = cluster.policy.connection_pool
        conn.host = host
        conn.counted = True
        host.conns.append(conn)
        host.live += 1
        host.breakers.connections += 1
        self.open.add(conn)

    def _with_room(self, host: HostPool) -> Upstream | None:
        limits = host.limits
        for conn in host.conns:
            if not (conn.closed or conn.going_away) and circuit.stream_room(
                limits, conn.peer_max_streams, len(conn.streams), conn.opened
            ):
                return conn
        return None

    def _new(self, host: HostPool) -> Upstream:
        conn = self._open(host.address, host.timeout, host.tls, host)
        host.conns.append(conn)
        host.live += 1
        return conn

    def _take(self, host: HostPool, conn: Upstream) -> None:
        """Counts the stream about to be opened on ``conn``; one that has carried
        maxRequestsPerConnection is drained: no new streams, closed when its calls end."""
        conn.opened += 1
        if circuit.spent(host.limits, conn.opened):
            conn.going_away = True
            host.conns.remove(conn)

    def wake(self, host: HostPool) -> None:
        """Room may have appeared for ``host``'s queued calls: placed soon, outside the
        protocol callback that freed it."""
        if not host.woken:
            host.woken = True
            self.relay.loop.call_soon(self._place_waiting, host)

    def wake_cluster(self, cluster: tuple[str, str]) -> None:
        """A connection of ``cluster`` closed: its hosts' queued calls may open one."""
        for host in self._hosts.values():
            if host.cluster == cluster and host.waiting:
                self.wake(host)

    def _place_waiting(self, host: HostPool) -> None:
        host.woken = False
        breakers = host.breakers
        while host.waiting:
            conn = self._with_room(host)
            if conn is None:
                if not breakers.open_connection(
                    host.limits, host_has_connection=host.live > 0, count=False
                ):
                    break
                conn = self._new(host)
            exchange = host.waiting.popleft()
            exchange.queue = None
            self._take(host, conn)
            exchange.place(conn)
        self.relay.flusher.flush()

    def _open(
        self, address: str, timeout: float | None, tls: ClientTls, host: HostPool | None
    ) -> Upstream:
        conn = Upstream(self.relay, address, host)
        self.open.add(conn)
        task = self.relay.loop.create_task(
            self._connect(
                conn, internal=address == self.relay.internal_address, timeout=timeout, tls=tls
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _connect(
        self, conn: Upstream, *, internal: bool, timeout: float | None, tls: ClientTls
    ) -> None:
        loop = self.relay.loop
        try:
            # A host that drops SYNs would otherwise hold its calls for the kernel's
            # connect timeout (minutes), not the configured one.
            if conn.address.startswith("unix:"):
                path = conn.address[len("unix:") :]
                await asyncio.wait_for(loop.create_unix_connection(lambda: conn, path), timeout)
                return
            host, _, port = conn.address.rpartition(":")
            host = host.strip("[]")
            context, server_name = (None, None) if internal else self._tls.context(tls, host)
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn, host, int(port), ssl=context, server_hostname=server_name
                ),
                timeout,
            )
        except (OSError, ValueError, ssl.SSLError) as exc:
            if isinstance(exc, TimeoutError) and not exc.args:  # wait_for's, not the kernel's
                exc = TimeoutError(f"connect timed out after {timeout}s")
            log.info("cannot connect to %s: %s", conn.address, exc)
            conn.connect_failed(exc)

    def _retire(self, conn: Upstream) -> None:
        """Closes ``conn`` once its streams are done (a GOAWAY'd or replaced connection)."""
        conn.going_away = True
        if not conn.streams and conn.transport is not None:
            conn.transport.close()

    def retain(self, addresses: Collection[str]) -> None:
        """Lets connections to addresses that left the mesh finish and close."""
        for key in [
            k for k in self._conns if k[0] not in addresses and k[0] != self.relay.internal_address
        ]:
            conn = self._conns.pop(key)
            conn.going_away = True
            self._retire(conn)
        for host_key in [k for k in self._hosts if k[1] not in addresses]:
            host = self._hosts.pop(host_key)
            for conn in host.conns:
                self._retire(conn)
            host.conns.clear()
            waiting, host.waiting = list(host.waiting), deque()
            for exchange in waiting:
                exchange.queue = None
                exchange.unplaced(f"{host.address} left the mesh while the call waited for it")

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conn in self.open:
            if conn.transport is not None:
                # abort, not close: a TLS close waits for the peer's close_notify, which a
                # stopping loop may never see (and the socket would outlive it).
                conn.transport.abort()
        self.open.clear()
        self._conns.clear()
        self._hosts.clear()
