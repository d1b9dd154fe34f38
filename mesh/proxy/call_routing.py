"""Routing a proxied call: end-user authn and the guard, the decision, faults, admission, mirroring.

Once the relay has what routing reads (the headers, and the first message when the host
hashes on request fields), the call is checked (the end-user JWT, the edge guard),
routed by the pure core (:func:`mesh.routing.decision.decide`), delayed or aborted by the
rule's fault, admitted under the cluster's ``http2MaxRequests``, and its first attempt
started; its mirrored copy (:mod:`mesh.proxy.mirror`) is opened here. A sidecar's inbound
admits the caller instead (:mod:`mesh.proxy.inbound`), and calls to the gateway's own
services go to its gRPC server (``_go_internal``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import grpc

from mesh.config.destination_rule import UNLIMITED
from mesh.config.virtual_service import Destination
from mesh.errors import MeshError
from mesh.proxy.attempt_timers import Timers
from mesh.proxy.grpc_status import OVERLOADED_TEXT
from mesh.proxy.inbound import ANONYMOUS, Inbound, edit_headers
from mesh.proxy.mirror import MIRROR_TIMEOUT, Mirror
from mesh.proxy.telemetry import TRACE_HEADERS
from mesh.routing import callpolicy as policy
from mesh.routing import circuit
from mesh.routing import headers as md
from mesh.routing.decision import RequestInfo, RouteDecision, decide
from mesh.routing.faults import fault_action, mirror_target
from mesh.security.request_authn import JwtIdentity

if TYPE_CHECKING:
    from mesh.proxy.downstream import Downstream

#: How much of a first message routing reads for ``model_name``/``model_version``.
FIELD_PREFIX = 1 << 16


class Routing(Timers):
    """From a call's headers (and first message) to its first attempt."""

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
            headers = md.text_headers(self.headers)
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
                        headers = md.as_dict(
                            ((k, v) for k, v in headers.items() if k not in outcome.consumed),
                            md.repeated(headers),
                        )
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
        in_flight = relay.state.tracker.total(cluster.healthy)
        if policy.over_request_limit(limit, in_flight):
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
        if limit < UNLIMITED:
            source = cast("Downstream", self.down.conn).source
            refused = relay.limiter.over_share(source, limit, in_flight)
            if refused is not None:
                # The client's own quota, not the destination's overflow: it alone is shed.
                self.decision = decision
                self._fail_early(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
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
