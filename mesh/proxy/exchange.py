"""One proxied call through the relay: route, forward frames, retry on ring successors.

An exchange pairs a client's stream (``down``) with a stream on an upstream connection
(``up``) and moves HEADERS and DATA between them unchanged except for the request's
headers, which carry the routing decision's edits, a request id and the remaining
deadline, and the response's headers, which carry the route's response header edits.
It keeps the request body while a retry is still possible, so a call that an upstream
refuses, drops or fails with a retryable status before answering is replayed on the
next ring successor.

:class:`Exchange` is the coordinator: it starts the call and takes the client's request
frames; the rest of the state machine is in the layers it is built on, each a module:
the call's fields (:mod:`~mesh.proxy.call_state`), how a call ends and the relay's own
answers (:mod:`~mesh.proxy.endings`), attempts (:mod:`~mesh.proxy.attempts`), retries
(:mod:`~mesh.proxy.retries`), timeouts (:mod:`~mesh.proxy.attempt_timers`), routing,
faults, admission and mirroring (:mod:`~mesh.proxy.call_routing`), and the response path
(:mod:`~mesh.proxy.responses`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mesh.proxy.hpack_codec import Header
from mesh.proxy.responses import Responses
from mesh.proxy.stream import Side
from mesh.routing import callpolicy as policy
from mesh.routing.callcheck import (
    MessageFramer,
    Rejection,
    check_end,
    check_headers,
    encoding_of,
)
from mesh.routing.methods import FLEET_METHODS, lookup

if TYPE_CHECKING:
    from mesh.proxy.relay import Relay

#: A request body larger than this is not kept for replay (Envoy's per-request buffer
#: limit plays the same part): such a call is not retried.
REPLAY_LIMIT = 1 << 20


class Exchange(Responses):
    """One call: the client's stream, the current attempt's upstream stream, and the body
    kept for replay. Fields: :class:`~mesh.proxy.call_state.CallState`."""

    def __init__(self, relay: Relay, down: Side, headers: list[Header], end_stream: bool) -> None:
        self.relay = relay
        self.down = down
        down.exchange = self
        self.headers = headers
        self.begun = relay.loop.time()
        self.active = self.begun
        self.path = ""
        self.authority = b""
        for name, value in headers:
            if name == b":path":
                self.path = value.decode("latin-1")
            elif name == b":authority":
                self.authority = value
        self.info = lookup(self.path)
        self.fleet = relay.internal_address is not None and self.path in FLEET_METHODS
        self.request_id = (
            policy.request_id(headers, relay.request_id) if relay.inbound is None else None
        )
        self.request_ended = end_stream
        self.body = []
        self.body_bytes = 0
        self.keep = self.info is not None and not self.info.client_streaming
        self.up = None
        self.endpoint = None
        self.internal = False
        self.decision = None
        self.response_edits = ()
        self.mirror = None
        self.cluster = None
        self.key = None
        self.attempt = -1
        self.started = False
        self.done = False
        self.deadline = None
        self._deadline_known = False
        self._timer = None
        self._tracked = False
        self._limited = False
        self._retried_transparently = False
        self.pending = None
        self.queue = None
        self._retrying = None
        self._held_headers = None
        self._held = []
        self._held_bytes = 0
        # Calls the relay forwards itself are recorded here; those it hands to the
        # gateway's gRPC server (its own services) are recorded there (see _go_internal).
        self.record = None
        if relay.telemetry is not None and (self.info is not None or relay.inbound is not None):
            self.record = relay.telemetry.start(self.path, headers, self.request_id)
        self.framer = MessageFramer(encoding_of(headers))
        relay.exchanges.add(self)
        # A malformed call is the relay's to answer (mesh/routing/callcheck.py): it never
        # reaches an upstream, so it never counts against one.
        rejected = check_headers(headers) or self._check_end()
        if rejected is not None:
            self._reject(rejected)
            return
        if self._ready():
            self._route()

    def _check_end(self) -> Rejection | None:
        """At the request's end: a unary or server-streaming call needs its message."""
        if not self.request_ended:
            return None
        info = self.info
        return check_end(
            self.framer.messages, client_streaming=info.client_streaming if info else None
        )

    def request_data(self, payload: bytes, flow: int, end_stream: bool) -> None:
        if self.done:
            self.down.credit_back(flow)
            return
        self.active = self.relay.now
        rejected = self.framer.feed(payload) if payload else None
        self.request_ended = end_stream
        if rejected is None and end_stream:
            rejected = self._check_end()
        if rejected is not None:
            self.down.credit_back(flow)
            self._reject(rejected)
            return
        if self.mirror is not None:
            self.mirror.send(payload, end_stream)
        up = self.up
        if up is not None and up.open:
            up.send_data(payload, end_stream=end_stream, on_sent=self.down.credit_back, flow=flow)
            if self.keep:
                self._keep(payload, 0)
            return
        # Not routed yet (or between attempts): held, and credited once forwarded.
        self.body.append((payload, flow))
        self.body_bytes += len(payload)
        if self.up is None and self.attempt < 0 and self.decision is None and self._ready():
            self._route()

    def _keep(self, payload: bytes, flow: int) -> None:
        self.body.append((payload, flow))
        self.body_bytes += len(payload)
        if self.body_bytes > REPLAY_LIMIT:
            self.keep = False
            self.body = [(p, fl) for p, fl in self.body if fl]

    def request_trailers(self, end_stream: bool) -> None:
        # gRPC clients send none; a peer that does ends its request with them.
        self.request_data(b"", 0, end_stream)
