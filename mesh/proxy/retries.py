"""Retry bookkeeping of a proxied call: whether a failed attempt is followed by another.

A failed attempt (refused, reset, dropped, a retryable status before any response was
forwarded, a per-try timeout) goes to the next ring successor when the route's retry
policy allows it (mesh/routing/callpolicy.py), the body is still kept, and the cluster
has room under ``maxRetries``; a stream the endpoint never ran is sent again once to the
same endpoint, as gRPC clients retry transparently. Between attempts the call waits
Envoy's jittered back-off. Which outcomes count against the endpoint (``blame``) is
decided here too.
"""

from __future__ import annotations

import logging

import grpc

from mesh.proxy.attempts import Attempts
from mesh.routing import callpolicy as policy
from mesh.routing import circuit

log = logging.getLogger(__name__)


class Retries(Attempts):
    """The step from a failed attempt to the next one, or to giving up."""

    def _may_retry(self, code: grpc.StatusCode, connection_failure: bool) -> bool:
        decision = self.decision
        if self.internal or self.started or decision is None or not self.keep:
            return False
        assert self.info is not None
        cluster = self.cluster
        return policy.may_retry(
            decision.retries,
            attempt=self.attempt,
            idempotent=self.info.idempotent,
            code=code,
            connection_failure=connection_failure,
            idempotent_only=cluster is not None and cluster.extensions.retry_idempotent_only,
        )

    def _admit_retry(self) -> bool:
        """``connectionPool.http.maxRetries``: whether the cluster has room for one more
        outstanding retry (held until that attempt ends); past it the retry is not
        attempted and the overflow is counted."""
        cluster = self.cluster
        if cluster is None:
            return True
        breakers = self.relay.pool.breakers_for(cluster)
        if not breakers.start_retry(cluster.policy.connection_pool):
            self.relay.overflowed(self, circuit.RETRIES)
            return False
        self._retrying = breakers
        return True

    def _failed_attempt(
        self,
        code: grpc.StatusCode,
        detail: str,
        *,
        connection_failure: bool,
        blame: bool = True,
        retry_admitted: bool = False,
    ) -> None:
        """The current attempt failed before answering: next successor or give up.
        ``retry_admitted``: the caller has checked eligibility and taken the retry's place
        under maxRetries already."""
        held = self._retrying if retry_admitted else None
        if held is not None:
            self._retrying = None  # the new retry's place, not the ending attempt's
        self._end_attempt(code, connection_failure=connection_failure, blame=blame)
        self._retrying = held
        address = self.endpoint.address if self.endpoint else self.relay.internal_address
        if retry_admitted or (self._may_retry(code, connection_failure) and self._admit_retry()):
            log.info(
                "retrying %s (x-request-id %s) on the next endpoint after %s from %s",
                self.path,
                self._call_id(),
                code.name,
                address,
            )
            self.relay.count_retry(self)
            self.up = None
            self._back_off()
            return
        self._give_up(code, f"upstream {address}: {detail}")

    def _back_off(self) -> None:
        """Waits Envoy's jittered back-off before the next attempt (never past the call's
        deadline). The timer slot holds it, so an ending call cancels it; request data
        that arrives meanwhile is held and replayed by the attempt."""
        relay = self.relay
        delay = policy.retry_backoff(self.attempt + 1, relay.state.rng)
        if self.deadline is not None:
            delay = min(delay, max(self.deadline - relay.loop.time(), 0.0))
        if self._timer is not None:
            self._timer.cancel()
        self._timer = relay.loop.call_later(delay, self._after_back_off)

    def _after_back_off(self) -> None:
        self._timer = None
        if not self.done:
            self._attempt()

    def _transparent_retry(self) -> bool:
        """Once per call, a stream the endpoint refused or GOAWAY'd (it never ran) goes to
        the same endpoint again, on a fresh connection, as gRPC clients retry
        transparently: a server rotating its connections (max connection age) or briefly
        at its stream limit is not a failure, even when it is the only endpoint."""
        if self._retried_transparently or not self.keep or self.internal or self.started:
            return False
        self._retried_transparently = True
        if self._tracked and self.endpoint is not None:
            self._tracked = False
            self.relay.state.tracker.finish(self.endpoint.address, self.key)
        self.attempt -= 1  # the same candidate
        self.up = None
        self._attempt()
        return True

    def _unprocessed(self, detail: str) -> None:
        """The upstream never saw the call (connect failed, refused or GOAWAY'd stream)."""
        self._failed_attempt(grpc.StatusCode.UNAVAILABLE, detail, connection_failure=True)

    def unplaced(self, detail: str) -> None:
        """The queued attempt's endpoint left: it never reached it (a connection failure)."""
        self._unprocessed(detail)

    def _upstreams_fault(self, code: grpc.StatusCode) -> bool:
        """Whether an upstream's status counts against it: a deadline it reached while
        still waiting for the client's request (it had the grpc-timeout the relay
        passed on) is the client's doing, like the relay's own timeout then."""
        return code is not grpc.StatusCode.DEADLINE_EXCEEDED or self.request_ended
