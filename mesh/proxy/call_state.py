"""What one proxied call holds, declared once for the layers that make up its Exchange.

:class:`~mesh.proxy.exchange.Exchange` is one class built in layers, each in its own
module (endings → attempts → retries → attempt_timers → call_routing → responses →
exchange), so that each piece of the call's state machine can be read on its own while a
call stays one object with plain method calls on the hot path (no per-call helper objects,
no delegation per frame). This base declares the call's fields (``Exchange.__init__`` sets
them) and the few helpers every layer uses.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mesh.balance.cluster import Cluster
from mesh.balance.endpoints import Endpoint
from mesh.config.virtual_service import HeaderOperations
from mesh.proxy.deadlines import Deadline
from mesh.proxy.hpack_codec import Header
from mesh.proxy.mirror import Mirror
from mesh.proxy.stream import Side
from mesh.proxy.telemetry import CallRecord
from mesh.routing import callpolicy as policy
from mesh.routing.callcheck import MessageFramer
from mesh.routing.circuit import CircuitBreakers
from mesh.routing.decision import RouteDecision
from mesh.routing.methods import MethodInfo

if TYPE_CHECKING:
    from mesh.proxy.pool import HostPool
    from mesh.proxy.relay import Relay


class CallState:
    """One call: the client's stream, the current attempt's upstream stream, and the body
    kept for replay."""

    relay: Relay
    #: The client's stream.
    down: Side
    #: The request's headers (after authn's edits, or the inbound's, once admitted).
    headers: list[Header]
    #: The call's first byte: the route timeout counts from here, so a client that
    #: never sends its message is answered at the route timeout, not held open.
    begun: float
    #: The last frame either way (relay.now, tick-coarse): the stream idle timeout.
    active: float
    path: str
    authority: bytes
    info: MethodInfo | None
    #: A call about the whole inference server (mesh/routing/methods.py): a gateway
    #: answers it for every worker, on its own gRPC server (gateway/fleet.py); a
    #: sidecar's outbound, which has no server of its own, relays it.
    fleet: bool
    #: The call's id, returned in the response's headers whatever answers it (an
    #: upstream, the gateway's own server, the relay itself). A sidecar's inbound
    #: leaves it to the proxy in front (None): the caller's id is already the call's.
    request_id: str | None
    request_ended: bool
    #: Request payloads received: those not yet forwarded carry their flow length
    #: (credited to the client when written upstream), forwarded ones carry 0.
    body: list[tuple[bytes, int]]
    body_bytes: int
    #: Whether the body is kept for replay (unary and server-streaming calls, up to
    #: exchange.REPLAY_LIMIT).
    keep: bool
    #: The current attempt's upstream stream.
    up: Side | None
    endpoint: Endpoint | None
    #: Sent to the gateway's own gRPC server (call_routing's ``_go_internal``).
    internal: bool
    decision: RouteDecision | None
    #: The route's response header edits (rule, then destination).
    response_edits: tuple[HeaderOperations, ...]
    #: The call's mirrored copy, while it is being fed.
    mirror: Mirror | None
    cluster: Cluster | None
    #: The decision's hash key: the endpoint's in-flight load is tracked under it.
    key: str | None
    attempt: int
    #: Response headers forwarded to the client: from here on no retry is possible.
    started: bool
    done: bool
    deadline: float | None
    _deadline_known: bool
    #: The fault delay, the retry back-off or the attempt's deadline (on the relay's
    #: DeadlineQueue: one per call would be a loop TimerHandle per call).
    _timer: asyncio.TimerHandle | Deadline | None
    #: The attempt's load is counted on its endpoint (relay.state.tracker).
    _tracked: bool
    #: Inbound mode: the call holds a place under the sidecar's concurrency limit.
    _limited: bool
    _retried_transparently: bool
    #: The cluster's breakers while this attempt is pending (waiting for a
    #: connection, or queued for stream capacity: ``queue``).
    pending: CircuitBreakers | None
    queue: HostPool | None
    #: The cluster's breakers while this attempt is a retry (maxRetries).
    _retrying: CircuitBreakers | None
    #: A unary response held back until its trailers: its headers, data (payload,
    #: flow) and their size. Cleared at each attempt.
    _held_headers: list[Header] | None
    _held: list[tuple[bytes, int]]
    _held_bytes: int
    # Calls the relay forwards itself are recorded here; those it hands to the
    # gateway's gRPC server (its own services) are recorded there (see _go_internal).
    record: CallRecord | None
    #: Follows the request's message boundaries (compressed flags, message count).
    framer: MessageFramer

    def _call_id(self) -> str:
        return self.request_id or self.relay.request_id()

    def _stamped(self, block: list[Header]) -> list[Header]:
        """A response header block (not trailers) with the call's id."""
        return block if self.request_id is None else policy.with_request_id(block, self.request_id)

    def _remaining(self, per_try: float | None) -> float | None:
        return policy.attempt_budget(self.deadline, self.relay.loop.time(), per_try)
