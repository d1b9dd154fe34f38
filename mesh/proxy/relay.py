"""The mesh's data plane: an HTTP/2 relay, at the gateway in front of its own gRPC server.

Why it exists: a gRPC proxy written with ``grpc.aio`` pays for two full gRPC calls per
request (a server call in, a client call out), and on a small machine that machinery,
not routing, is most of the gateway's cost (docs/benchmarks.md). The relay never parses
a gRPC message: it reads HTTP/2 frames, routes each new stream with the same pure core
(:func:`mesh.routing.decision.decide`), and forwards the stream's frames to a pooled
upstream connection, as Envoy does. Everything a route asks for happens here: retries,
timeouts, fault injection, mirroring (:mod:`mesh.proxy.mirror`) and header edits. Only
the gateway's own services (Admin, health, reflection) are answered by a gRPC server,
behind the relay on a private Unix socket.

A sidecar's inbound port is the same relay in another mode (:mod:`mesh.proxy.inbound`):
TLS listeners, each call checked against the sidecar's policies and sent to its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Mapping

import grpc

from mesh.balance.endpoints import Endpoint
from mesh.proxy import frames as f
from mesh.proxy.call_state import CallState
from mesh.proxy.deadlines import DeadlineQueue
from mesh.proxy.downstream import Downstream
from mesh.proxy.exchange import Exchange
from mesh.proxy.flusher import Flusher
from mesh.proxy.inbound import Inbound
from mesh.proxy.pool import UpstreamPool
from mesh.proxy.telemetry import RelayTelemetry
from mesh.proxy.tls_door import TlsDoor
from mesh.routing.hashkey import MODEL_NAMED_METHODS
from mesh.routing.limits import RelayLimits, SourceLimiter
from mesh.routing.services import host_for_method
from mesh.routing.state import GatewayState
from mesh.security.request_authn import JwtIdentity, RequestAuthenticator
from mesh.telemetry.metrics import MeshMetrics, labels
from mesh.telemetry.setup import Telemetry

log = logging.getLogger(__name__)


class Relay:
    """Listens for clients and relays each gRPC call to an upstream (see module doc)."""

    def __init__(
        self,
        state: GatewayState,
        *,
        internal_address: str | None,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        request_id: Callable[[], str] | None = None,
        metrics: MeshMetrics | None = None,
        telemetry: Telemetry | None = None,
        guard: Callable[[str, Mapping[str, str], JwtIdentity | None], None] | None = None,
        guard_when: Callable[[], bool] | None = None,
        authn: RequestAuthenticator | None = None,
        inbound: Inbound | None = None,
        limits: RelayLimits | None = None,
    ) -> None:
        self.state = state
        #: A sidecar's inbound: each call is checked and goes to the worker, not routed.
        self.inbound = inbound
        #: Timeouts and per-source limits (mesh/routing/limits.py).
        self.limits = limits or RelayLimits()
        #: Admits a call (method, text metadata, its verified end-user JWT) or raises a
        #: MeshError: client auth, authorization and rate limits
        #: (gateway.auth.ClientGuard.check).
        self.guard = guard
        #: Whether the guard has anything to check now (None: always): a gateway without
        #: an auth file runs its guard only while an AuthorizationPolicy selects it.
        self.guard_when = guard_when
        #: RequestAuthentication (mesh.security.request_authn): checks the end-user JWT
        #: before the guard, and edits the headers that go on; raises Unauthenticated.
        self.authn = authn
        #: Spans and request metrics for the calls the relay forwards itself.
        self.telemetry = (
            RelayTelemetry(telemetry)
            if telemetry is not None and RelayTelemetry.records(telemetry)
            else None
        )
        #: The gRPC server behind the relay (None: a sidecar's outbound, which has none;
        #: calls that would need it are refused with UNIMPLEMENTED).
        self.internal_address = internal_address
        # 128 random bits as 32 hex digits, like a uuid4's hex but without a syscall.
        bits = random.Random().getrandbits
        self.request_id = request_id or (lambda: f"{bits(128):032x}")
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        #: The loop's time as of the last timer tick: activity stamps read it instead of
        #: the clock (one attribute read per frame); timeouts are tick-coarse anyway.
        self.now = self.loop.time()
        self.limiter = SourceLimiter(self.limits, self.loop.time)
        self._tick: asyncio.TimerHandle | None = None
        self.flusher = Flusher()
        #: Calls' attempt deadlines, on one loop timer (mesh/proxy/deadlines.py).
        self.deadlines = DeadlineQueue(self.loop)
        self.pool = UpstreamPool(self, ssl_context)
        self.exchanges: set[Exchange] = set()
        self.downstreams: set[Downstream] = set()
        #: Connections at a TLS listener's door (mesh.proxy.tls_door): handshakes not
        #: finished, and plaintext clients being told why not. Closed at drain.
        self.at_door: set[asyncio.Transport] = set()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        self._needs_message: dict[str, bool] = {}
        self._needs_config: object = None

    async def start(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> int:
        """Listens on ``host:port`` (0: any free port), with TLS when ``tls`` is given;
        returns the bound port. A relay may listen on several ports (a sidecar's
        PERMISSIVE mode: mutual TLS on one, plaintext on another)."""
        factory: Callable[[], asyncio.Protocol]
        if tls is None:
            factory = lambda: Downstream(self)  # noqa: E731
        else:
            # Through the door: a plaintext client is told that TLS is required, at once,
            # instead of redialling a dropped connection until its deadline.
            factory = lambda: TlsDoor(  # noqa: E731
                lambda: Downstream(self),
                tls,
                self.at_door,
                self.limiter,
                handshake_timeout=self.limits.request_headers_timeout or None,
            )
        try:
            server = await self.loop.create_server(factory, host, port, reuse_address=True)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        if self._tick is None:  # one timer for every listener
            self._tick = self.loop.call_later(self.limits.tick, self._check_timers)
        return bound

    def _check_timers(self) -> None:
        """One pass over connections and their calls each tick: the timeouts of
        RelayLimits and the deadline of calls not routed yet (one timer in all, not one
        per stream)."""
        now = self.now = self.loop.time()
        limits = self.limits
        try:
            for conn in list(self.downstreams):
                if not conn.closed:
                    conn.check_timers(now, limits)
        finally:
            self.flusher.flush()
            self._tick = self.loop.call_later(limits.tick, self._check_timers)

    def needs_message(self, path: str) -> bool:
        """Whether routing waits for the first message: the host hashes on its fields, or
        one of its rules matches on the model the request names."""
        clusters = self.state.clusters
        # Keyed by the view's route table: it changes with the config and with the view
        # (which VirtualService of a host applies depends on where this proxy routes).
        if clusters.routes is not self._needs_config:
            self._needs_config, self._needs_message = clusters.routes, {}
        found = self._needs_message.get(path)
        if found is None:
            host = host_for_method(path)
            rule = clusters.config.destination_rule(host) if host else None
            vs = clusters.routes.virtual_service(host) if host else None
            found = self._needs_message[path] = (
                rule is not None and bool(rule.extensions.hash_fields)
            ) or (vs is not None and vs.matches_model and path in MODEL_NAMED_METHODS)
        return found

    def record(
        self,
        exchange: CallState,
        endpoint: Endpoint,
        code: grpc.StatusCode,
        *,
        connection_failure: bool = False,
    ) -> None:
        cluster, decision = exchange.cluster, exchange.decision
        if cluster is None or decision is None or cluster.outliers is None:
            return
        if cluster.outliers.record(
            endpoint.address, code, cluster.healthy, connection_failure=connection_failure
        ):
            log.warning("ejected %s from %s after %s", endpoint.address, decision.target, code.name)
            if self.metrics is not None:
                self.metrics.ejected(decision.target, endpoint.address)

    def overflowed(self, exchange: CallState, kind: str) -> None:
        """A circuit breaker of the call's cluster overflowed (mesh/routing/circuit.py;
        the breakers count it themselves): exported as ``meshserve.overflows``."""
        decision = exchange.decision
        if self.metrics is not None and decision is not None:
            self.metrics.overflowed(decision.target, kind)

    def count_retry(self, exchange: CallState) -> None:
        decision = exchange.decision
        if self.metrics is not None and decision is not None:
            self.metrics.retried(labels(route=decision.route, destination=decision.target))

    async def drain(self, grace: float) -> None:
        """Stops accepting, tells clients (GOAWAY), lets calls in flight finish for up
        to ``grace`` seconds, then closes every connection."""
        self.draining = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for server in self._servers:
            server.close()
        for transport in list(self.at_door):
            transport.abort()
        for conn in list(self.downstreams):
            conn.write(f.goaway(conn.last_stream, f.NO_ERROR))
        self.flusher.flush()
        deadline = self.loop.time() + grace
        # A finished call may still have response frames queued for its client's window:
        # its stream stays open on the downstream until they are written. Checked every
        # 20 ms: streams end in protocol callbacks on many paths, and a shutdown can
        # afford a poll where the hot path could not afford a notification per stream.
        while (
            self.exchanges or any(conn.streams for conn in self.downstreams)
        ) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for exchange in list(self.exchanges):
            exchange.client_reset()
        self.flusher.flush()
        for conn in list(self.downstreams):
            if conn.transport is not None:
                conn.transport.close()
        # A TLS close (a sidecar's listener) writes what is queued, then waits for the
        # client's close_notify, which a stopping loop may never see: a moment, then abort.
        deadline = self.loop.time() + 1.0
        while self.downstreams and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.downstreams):
            if conn.transport is not None:
                conn.transport.abort()
        self.pool.close()
        self.deadlines.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
