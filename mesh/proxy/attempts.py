"""One attempt of a proxied call: the upstream it goes to, its headers, its place on a connection.

An attempt picks its endpoint (the decision's ring successors in turn; the worker, for a
sidecar's inbound; the gateway's own gRPC server, for its internal services), checks the
deadline it has left, arms its route/per-try timer, gets a stream from the pool (or waits
as pending, or overflows maxPendingRequests) and sends the request headers (the
decision's edits, the call's remaining deadline as grpc-timeout, the hop's trace context)
and the body kept so far. Whether a failed attempt is followed by another is
:mod:`mesh.proxy.retries`'s to decide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import grpc

from mesh.proxy.endings import Endings
from mesh.proxy.grpc_status import OVERLOADED
from mesh.proxy.hpack_codec import Header
from mesh.proxy.telemetry import TRACE_HEADERS
from mesh.routing import callpolicy as policy
from mesh.routing import circuit
from mesh.routing import headers as md

if TYPE_CHECKING:
    from mesh.proxy.exchange import Exchange
    from mesh.proxy.pool import Upstream


class Attempts(Endings):
    """Starting an attempt and placing it on an upstream connection."""

    def _expired(self) -> None:
        """The attempt's timer fired: :class:`mesh.proxy.attempt_timers.Timers`."""
        raise NotImplementedError

    def _attempt(self) -> None:
        relay = self.relay
        self.attempt += 1
        self._leave_pending()  # an attempt replaced while pending waits no more
        self._held_headers, self._held, self._held_bytes = None, [], 0
        decision = self.decision
        if self.internal:
            assert relay.internal_address is not None  # _go_internal checked
            address = relay.internal_address
            self.endpoint = None
            per_try = None
        elif decision is None:  # inbound: the worker (_route_inbound)
            assert self.endpoint is not None
            address = self.endpoint.address
            per_try = None
        else:
            # Past the last candidate a retry goes round again: as Envoy's previous-hosts
            # predicate, it avoids endpoints already tried only while another is left.
            self.endpoint = decision.candidates[self.attempt % len(decision.candidates)]
            address = self.endpoint.address
            per_try = decision.retries.per_try_timeout
            relay.state.tracker.start(address, self.key)
            self._tracked = True
        remaining = self._remaining(per_try)
        if remaining is not None and remaining <= 0:
            self._give_up(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before an attempt")
            return
        # The client's own deadline needs no timer here: the client ends the call (and the
        # relay then resets the upstream), and the upstream got it as grpc-timeout. A
        # route timeout or per-try timeout is the relay's to enforce, pending time included.
        if decision is not None and (per_try is not None or decision.timeout is not None):
            self._arm_timer(remaining)
        cluster = None if self.internal else self.cluster
        if cluster is None:
            self._send_on(relay.pool.get(address))
            return
        # This layer is part of one Exchange (call_state.py): the pool queues the call.
        got = relay.pool.acquire(cast("Exchange", self), address, cluster)
        if isinstance(got, str):
            self._overloaded(circuit.PENDING, cluster.policy.connection_pool.max_pending_requests)
        elif got is not None:
            self._send_on(got)
        # else queued: the pool places it when a connection has room (place)

    def place(self, conn: Upstream) -> None:
        """The pool found room for this queued attempt on ``conn``."""
        if conn.connected:
            self._leave_pending()
        self._send_on(conn)

    def upstream_connected(self) -> None:
        """The connection this attempt's stream waited for is up: no longer pending."""
        self._leave_pending()

    def _overloaded(self, kind: str, limit: int) -> None:
        """A circuit breaker shed the call (Envoy's 503 overflow, never retried)."""
        self.relay.overflowed(self, kind)
        self._end_attempt(grpc.StatusCode.UNAVAILABLE, blame=False)
        target = self.decision.target if self.decision is not None else self.path
        self._give_up(
            grpc.StatusCode.UNAVAILABLE,
            f"{target}: {kind} overflow ({circuit.FIELDS[kind]}: {limit})",
            (OVERLOADED,),
        )

    def _send_on(self, conn: Upstream) -> None:
        """Opens the attempt's stream on ``conn`` and sends what the client sent so far."""
        address = conn.address
        decision = self.decision
        per_try = decision.retries.per_try_timeout if decision is not None else None
        up = self.up = conn.open_stream(self)
        body = self.body
        up.send_headers(
            self._upstream_headers(per_try, address), end_stream=self.request_ended and not body
        )
        last = len(body) - 1
        credit = self.down.credit_back
        for i, (payload, flow) in enumerate(body):
            end = self.request_ended and i == last
            up.send_data(payload, end_stream=end, on_sent=credit if flow else None, flow=flow)
        if self.keep:
            self.body = [(p, 0) for p, _ in body]
        else:
            self.body = []
            self.body_bytes = 0

    def _upstream_headers(self, per_try: float | None, address: str) -> list[Header]:
        decision = self.decision
        if decision is None:
            telemetry, record = self.relay.telemetry, self.record
            if self.internal or telemetry is None or record is None:
                return self.headers
            return [*self.headers, *telemetry.attempt(record, address, self.attempt)]
        metadata = decision.metadata
        telemetry, record = self.relay.telemetry, self.record
        traced: list[Header] = []
        if telemetry is not None and record is not None:
            # This hop's span is the upstream's parent, in place of the caller's.
            metadata = tuple((k, v) for k, v in metadata if k not in TRACE_HEADERS)
            traced = telemetry.attempt(record, address, self.attempt)
        out = self._base_headers(metadata, traced)
        remaining = self._remaining(per_try)
        if remaining is not None:
            out.append((b"grpc-timeout", policy.format_timeout(remaining)))
        return out

    def _base_headers(self, metadata: md.Metadata, extra: Iterable[Header] = ()) -> list[Header]:
        """A routed call's request headers upstream, less its grpc-timeout: pseudo-headers,
        gRPC's transport headers and binary metadata as they came, then ``extra``, then
        the decision's (edited) text metadata."""
        out: list[Header] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", self.path.encode("latin-1")),
        ]
        if self.authority:
            out.append((b":authority", self.authority))
        for name, value in self.headers:
            if name in policy.TRANSPORT or (name.endswith(b"-bin") and name[:1] != b":"):
                out.append((name, value))
        out.extend(extra)
        out.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in metadata)
        return out

    def _arm_timer(self, remaining: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if remaining is not None:
            self._timer = self.relay.deadlines.call_later(remaining, self._expired)
