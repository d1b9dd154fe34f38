"""One proxied call through the relay: route, forward frames, retry on ring successors.

An exchange pairs a client's stream (``down``) with a stream on an upstream connection
(``up``) and moves HEADERS and DATA between them unchanged except for the request's
headers, which carry the routing decision's edits, a request id and the remaining
deadline, and the response's headers, which carry the route's response header edits.
It keeps the request body while a retry is still possible, so a call that an upstream
refuses, drops or fails with a retryable status before answering is replayed on the
next ring successor. A rule's fault is injected here (a delay on the loop's timer, an
abort answered by the relay) and its mirror fed from here (:mod:`mesh.proxy.mirror`).

Calls to the gateway's own services (Admin, reflection, health) go to the gateway's
gRPC server instead (``_go_internal``): they are not mesh calls; nor are the calls about
the whole inference fleet (model control, index, statistics), which it answers there
for every worker (gateway/fleet.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import grpc

from mesh.config.virtual_service import Destination
from mesh.errors import MeshError
from mesh.proxy import frames as f
from mesh.proxy.attempt_timers import Timers
from mesh.proxy.connection import STREAM_WINDOW, Side
from mesh.proxy.grpc_status import (
    OVERLOADED_TEXT,
    message_of,
    status_of,
)
from mesh.proxy.hpack_codec import Header
from mesh.proxy.inbound import ANONYMOUS, Inbound, edit_headers
from mesh.proxy.mirror import MIRROR_TIMEOUT, Mirror
from mesh.proxy.telemetry import TRACE_HEADERS
from mesh.routing import callpolicy as policy
from mesh.routing import circuit
from mesh.routing import headers as md
from mesh.routing.callcheck import (
    MessageFramer,
    Rejection,
    check_end,
    check_headers,
    encoding_of,
)
from mesh.routing.decision import RequestInfo, RouteDecision, decide
from mesh.routing.faults import fault_action, mirror_target
from mesh.routing.methods import FLEET_METHODS, lookup
from mesh.security.request_authn import JwtIdentity

if TYPE_CHECKING:
    from mesh.proxy.relay import Downstream, Relay


#: A request body larger than this is not kept for replay (Envoy's per-request buffer
#: limit plays the same part): such a call is not retried.
REPLAY_LIMIT = 1 << 20
#: A unary response is held back up to this many bytes until its trailers (then it is
#: forwarded and the call committed): under half the stream window the relay advertises
#: upstream, so the upstream never waits for credit the relay gives only on forwarding.
HOLD_LIMIT = STREAM_WINDOW // 2
#: How much of a first message routing reads for ``model_name``/``model_version``.
FIELD_PREFIX = 1 << 16


class Exchange(Timers):
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

    def _ready(self) -> bool:
        """Whether routing has what it needs: the first message, when the host hashes on
        request fields."""
        if self.info is None or self.request_ended or self.fleet:
            return True
        if not self.relay.needs_message(self.path):
            return True
        if self.body_bytes < 5:
            return False
        head = b"".join(p for p, _ in self.body)
        return self.body_bytes >= min(5 + int.from_bytes(head[1:5], "big"), FIELD_PREFIX)

    def _first_message(self) -> bytes | None:
        if not self.relay.needs_message(self.path) or self.body_bytes < 5:
            return None
        head = b"".join(p for p, _ in self.body)
        if head[0] != 0:
            return None  # compressed: its fields cannot be read
        return head[5 : 5 + min(int.from_bytes(head[1:5], "big"), FIELD_PREFIX)]

    def _route(self) -> None:
        relay = self.relay
        identity: JwtIdentity | None = None
        # Without rules for this workload the end-user check costs nothing per call.
        authn = relay.authn if relay.authn is not None and relay.authn.rules() else None
        guard = relay.guard
        if guard is not None and relay.guard_when is not None and not relay.guard_when():
            guard = None
        if guard is not None or authn is not None:
            headers = {
                n.decode("latin-1"): v.decode("latin-1")
                for n, v in self.headers
                if n[:1] != b":" and not n.endswith(b"-bin")
            }
            try:
                # The end-user JWT first: the guard authorizes with its principal. The
                # header edits come after the guard, which reads the headers as sent.
                outcome = authn(headers) if authn is not None else None
                if outcome is not None:
                    identity = outcome.identity
                if guard is not None:
                    if outcome is not None and outcome.consumed:
                        # An end-user token is not an edge credential (an open data plane
                        # admits the call; AuthorizationPolicy sees the end user).
                        headers = {k: v for k, v in headers.items() if k not in outcome.consumed}
                    guard(self.path, headers, identity)
            except MeshError as exc:
                self._fail_early(exc.code, exc.message, exc.trailers)
                return
            if outcome is not None and (outcome.remove or outcome.add):
                self.headers = edit_headers(self.headers, outcome.remove, outcome.add)
        if relay.inbound is not None:
            self._route_inbound(relay.inbound, identity)
            return
        if self.info is None or self.fleet:
            self._go_internal()
            return
        text = policy.routing_metadata(self.headers, self._call_id)
        clusters = relay.state.clusters
        downstream = cast("Downstream", self.down.conn)
        try:
            decision = decide(
                clusters,
                RequestInfo(
                    self.path,
                    text,
                    authority=self.authority.decode("latin-1"),
                    message=self._first_message(),
                    port=downstream.local_port,
                    source_ip=downstream.source_ip,
                ),
                relay.state.rng,
            )
        except MeshError as exc:
            self._fail_early(exc.code, str(exc))
            return
        fault = fault_action(decision.fault, relay.state.rng)
        if fault.delay is not None:
            # Held on a timer (cancelled with the call: _finish), not a task per call.
            self.decision = decision
            self._timer = relay.loop.call_later(fault.delay, self._admit, decision, fault.abort)
            return
        self._admit(decision, fault.abort)

    def _admit(self, decision: RouteDecision, abort: grpc.StatusCode | None) -> None:
        """After any fault delay: the fault's abort, admission, then the first attempt."""
        relay = self.relay
        self._timer = None
        if abort is not None:
            # The relay's own answer: no endpoint saw the call, none is blamed.
            self._fail_early(abort, f"fault injected by {decision.route}")
            return
        clusters = relay.state.clusters
        if not decision.candidates:
            self._fail_early(
                grpc.StatusCode.UNAVAILABLE,
                f"no healthy endpoint for host {decision.host!r} subset {decision.subset!r}",
            )
            return
        cluster = clusters.cluster(decision.host, decision.subset)
        limit = cluster.policy.connection_pool.http2_max_requests
        if policy.over_request_limit(limit, relay.state.tracker.total(cluster.healthy)):
            relay.pool.breakers_for(cluster).shed_request()
            self.decision = decision
            relay.overflowed(self, circuit.REQUESTS)
            self._fail_early(
                grpc.StatusCode.UNAVAILABLE,
                f"{decision.target} has {limit} requests in flight "
                "(connectionPool.http.http2MaxRequests)",
                (OVERLOADED_TEXT,),
            )
            return
        self.decision, self.cluster = decision, cluster
        self.response_edits = decision.response_headers
        if self.record is not None and relay.telemetry is not None:
            relay.telemetry.routed(self.record, decision)
        self.key = decision.hash_key.key if decision.hash_key else None
        self.deadline = policy.call_deadline(
            self.begun, policy.client_timeout(self.headers), decision.timeout
        )
        mirror = mirror_target(decision, relay.state.rng)
        if mirror is not None:
            self._start_mirror(decision, mirror)
        # The body stays kept (up to REPLAY_LIMIT) even with no retries configured: a
        # stream the endpoint never ran is sent again once (_transparent_retry).
        self._attempt()

    def _start_mirror(self, decision: RouteDecision, target: Destination) -> None:
        """Opens the copy's stream and sends it what the client sent so far; the rest
        follows frame by frame (request_data)."""
        relay = self.relay
        cluster = relay.state.clusters.cluster(target.host, target.subset or "")
        pick = cluster.pick(self.key, relay.state.rng)
        if not pick.candidates:
            return
        remaining = self._remaining(None)
        timeout = MIRROR_TIMEOUT if remaining is None else max(remaining, 0.0)
        headers = self._base_headers(decision.metadata)
        headers.append((md.SHADOW.encode(), b"1"))
        headers.append((b"grpc-timeout", policy.format_timeout(timeout)))
        mirror = self.mirror = Mirror(
            relay, pick.candidates[0].address, headers, timeout, cluster.tls
        )
        body = self.body
        if not body and self.request_ended:
            mirror.send(b"", True)
        last = len(body) - 1
        for i, (payload, _) in enumerate(body):
            mirror.send(payload, self.request_ended and i == last)

    def _route_inbound(self, inbound: Inbound, identity: JwtIdentity | None) -> None:
        """A sidecar's inbound: the caller is checked (identity, policies, limit), then the
        call goes to the worker unrouted, or to the sidecar's own gRPC server (health,
        reflection). The worker gets the client's deadline as it came (grpc-timeout)."""
        caller = cast("Downstream", self.down.conn).caller or ANONYMOUS
        try:
            headers = inbound.admit(self.path, self.headers, caller, identity)
        except MeshError as exc:
            self._fail_early(exc.code, exc.message, exc.trailers)
            return
        if headers is None:
            self._go_internal()
            return
        self._limited = True
        if self.record is not None:
            # This hop's span is the worker's parent, in place of the caller's.
            headers = [(n, v) for n, v in headers if n.decode("latin-1") not in TRACE_HEADERS]
        self.headers = headers
        self.endpoint = inbound.endpoint
        self._attempt()

    def _go_internal(self) -> None:
        """Sends the call, headers untouched, to the gateway's full gRPC server."""
        if self.relay.internal_address is None:
            # A sidecar's outbound has no gRPC server behind it (no Admin, health or
            # reflection of its own): such a call is refused by name.
            self._fail_early(grpc.StatusCode.UNIMPLEMENTED, f"{self.path}: not a mesh method")
            return
        self.internal = True
        self.keep = False
        if self.record is not None and self.relay.telemetry is not None:
            self.relay.telemetry.abandon(self.record)
            self.record = None
        self._attempt()

    def response_headers(self, up: Side, headers: list[Header], end_stream: bool) -> None:
        if up is not self.up or self.done:
            return
        self.active = self.relay.now
        if end_stream:
            code = status_of(headers)
            up.close()
            if not self.started and code is not grpc.StatusCode.OK and self._may_retry(code, False):
                self._end_retry()  # this attempt's own place first, as Envoy frees it
                if self._admit_retry():
                    self._failed_attempt(
                        code,
                        code.name,
                        connection_failure=False,
                        blame=self._upstreams_fault(code),
                        retry_admitted=True,
                    )
                    return
                # Past maxRetries: the upstream's answer goes to the client as it came.
            self._release(up)
            self._end_attempt(code, blame=self._upstreams_fault(code))
            if not self.started:
                # Trailers-only: these are the response's headers too.
                headers = self._stamped(headers)
                if self.response_edits:
                    headers = md.edit_block(self.response_edits, headers)
            self.down.send_headers(headers, end_stream=True)
            self._finish(code, message_of(headers))
            return
        if self.started or self._held_headers is not None:
            return  # a second header block without END_STREAM: not gRPC, ignored
        if self.info is not None and not self.info.server_streaming and not self.internal:
            # A unary response is held until its trailers (up to HOLD_LIMIT): an upstream
            # that dies mid-response is then retried like one that died before it.
            self._held_headers = headers
            return
        self._commit(headers)

    def _commit(self, headers: list[Header]) -> None:
        """Response headers go to the client: from here on no retry is possible."""
        self.started = True
        self.body = []
        self.body_bytes = 0
        self.keep = False
        headers = self._stamped(headers)
        if self.response_edits:
            headers = md.edit_block(self.response_edits, headers)
        self.down.send_headers(headers, end_stream=False)

    def _release(self, up: Side) -> None:
        """Forwards a held response's headers and data (the call is committed)."""
        if self._held_headers is None or self.started:
            return
        self._commit(self._held_headers)
        for payload, flow in self._held:
            self.down.send_data(payload, end_stream=False, on_sent=up.credit_back, flow=flow)
        self._held_headers, self._held, self._held_bytes = None, [], 0

    def response_data(self, up: Side, payload: bytes, flow: int, end_stream: bool) -> None:
        if up is not self.up or self.done:
            up.credit_back(flow)
            return
        self.active = self.relay.now
        if self._held_headers is not None and not self.started:
            if not end_stream and self._held_bytes + len(payload) <= HOLD_LIMIT:
                self._held.append((payload, flow))
                self._held_bytes += len(payload)
                return
            self._release(up)
        self.down.send_data(payload, end_stream=end_stream, on_sent=up.credit_back, flow=flow)
        if end_stream:
            # DATA ending a response has no trailers: gRPC calls that an internal error.
            up.close()
            self._end_attempt(grpc.StatusCode.INTERNAL)
            self._finish(grpc.StatusCode.INTERNAL, "the response ended without trailers")

    def upstream_reset(self, up: Side, code: int) -> None:
        if up is not self.up or self.done:
            return
        if code == f.REFUSED_STREAM:
            # RFC 9113 §8.7: the upstream did not process the stream; any call may be retried.
            if self._transparent_retry():
                return
            self._unprocessed("refused the stream")
            return
        status = grpc.StatusCode.CANCELLED if code == f.CANCEL else grpc.StatusCode.UNAVAILABLE
        if self.started:
            self._end_attempt(status)
            self._give_up(status, f"upstream reset the stream (HTTP/2 error {code})")
            return
        self._failed_attempt(
            status, f"reset the stream (HTTP/2 error {code})", connection_failure=False
        )

    def upstream_lost(self, up: Side, detail: str, *, connected: bool) -> None:
        """The upstream connection closed (``connected``) or could not be opened."""
        if up is not self.up or self.done:
            return
        if not connected:
            self._unprocessed(detail)
            return
        if self.started:
            self._end_attempt(grpc.StatusCode.UNAVAILABLE)
            self._give_up(grpc.StatusCode.UNAVAILABLE, f"upstream connection lost: {detail}")
            return
        self._failed_attempt(grpc.StatusCode.UNAVAILABLE, detail, connection_failure=False)
