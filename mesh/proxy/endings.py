"""How a proxied call ends: the relay's own answers and letting go of what the call holds.

Every way out of an :class:`~mesh.proxy.exchange.Exchange` comes through here: the
relay's own trailers-only answers (a refusal, a malformed call, a routing failure, a
timeout) and its trailers after a committed response (``_give_up``), a client's
cancellation, and ``_finish``, which releases what the call and its attempt hold (a
pending place, a retry place under maxRetries, the endpoint's in-flight load, the
sidecar's concurrency slot, the timer, the mirror) exactly once, whatever ended it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import grpc

from mesh.proxy import frames as f
from mesh.proxy.call_state import CallState
from mesh.proxy.grpc_status import error_headers
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import ENDED
from mesh.routing.callcheck import Rejection

if TYPE_CHECKING:
    from mesh.proxy.exchange import Exchange


class Endings(CallState):
    """The ends of a call (see the module docstring)."""

    def _leave_pending(self) -> None:
        if self.queue is not None:
            # This layer is part of one Exchange (call_state.py), which the pool queued.
            self.queue.waiting.remove(cast("Exchange", self))
            self.queue = None
        if self.pending is not None:
            self.pending.remove_pending()
            self.pending = None

    def _end_retry(self) -> None:
        """Envoy's retry is outstanding until the outcome of its attempt is known."""
        if self._retrying is not None:
            self._retrying.end_retry()
            self._retrying = None

    def _end_attempt(
        self, code: grpc.StatusCode, *, connection_failure: bool = False, blame: bool = True
    ) -> None:
        """Counts the attempt's outcome for in-flight loads and, when the upstream
        produced it (``blame``), for outlier detection: an outcome the relay or the
        client caused (its own validation, a timeout waiting for the client, a
        cancellation) never counts against an endpoint."""
        self._leave_pending()
        self._end_retry()
        endpoint, cluster = self.endpoint, self.cluster
        if endpoint is None or cluster is None:
            return
        if self._tracked:
            self._tracked = False
            self.relay.state.tracker.finish(endpoint.address, self.key)
        if blame:
            self.relay.record(self, endpoint, code, connection_failure=connection_failure)

    def _timed_out(self, message: str) -> None:
        """The relay's own timers (stream idle, or the deadline of a call not routed
        yet) ended the call: never an endpoint's failure (a quiet server stream is not
        broken; an upstream that never answers a whole request meets the route timeout),
        as Envoy's stream idle timeout is not."""
        if self.up is not None:
            self.up.reset(f.CANCEL)
        self._end_attempt(grpc.StatusCode.DEADLINE_EXCEEDED, blame=False)
        self._give_up(grpc.StatusCode.DEADLINE_EXCEEDED, message)

    def client_reset(self) -> None:
        """The client cancelled (RST_STREAM) or its connection went away."""
        if self.done:
            return
        if self.up is not None:
            self.up.reset(f.CANCEL)
        self._end_attempt(grpc.StatusCode.CANCELLED, blame=False)
        self._finish(grpc.StatusCode.CANCELLED, "cancelled by the client")

    def _reject(self, rejection: Rejection) -> None:
        """Answers a malformed call (mesh/routing/callcheck.py) without any upstream: one
        already opened is cancelled, and nothing counts against its endpoint."""
        if self.up is not None and self.up.open:
            self.up.reset(f.CANCEL)
        self._end_attempt(rejection.code, blame=False)
        self._give_up(rejection.code, rejection.message, rejection.headers)

    def _fail_early(
        self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Answers without any upstream (refused, or routing failed)."""
        headers = error_headers(code, message, trailers_only=True)
        headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in trailers)
        self.down.send_headers(self._stamped(headers), end_stream=True)
        self._finish(code, message)

    def _give_up(self, code: grpc.StatusCode, message: str, extra: tuple[Header, ...] = ()) -> None:
        if self.up is not None and self.up.open:
            self.up.reset(f.CANCEL)
        headers = error_headers(code, message, trailers_only=not self.started)
        headers.extend(extra)
        if not self.started:
            headers = self._stamped(headers)
        self.down.send_headers(headers, end_stream=True)
        self._finish(code, message)

    def _finish(self, code: grpc.StatusCode, message: str | None) -> None:
        """Ends the exchange with the status the client was sent."""
        if self.done:
            return
        self.done = True
        if self.mirror is not None:
            if not self.request_ended:
                # The copy's request would never end: it goes with the primary.
                self.mirror.drop()
            self.mirror = None
        if self.record is not None and self.relay.telemetry is not None:
            self.relay.telemetry.finish(self.record, code, message)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tracked and self.endpoint is not None:
            self._tracked = False
            self.relay.state.tracker.finish(self.endpoint.address, self.key)
        self._leave_pending()
        self._end_retry()
        if self._limited and self.relay.inbound is not None:
            self._limited = False
            self.relay.inbound.limit.release()
        # A client still sending is told to stop once the response is out (RFC 9113 §8.1
        # allows RST_STREAM NO_ERROR after a complete response).
        self.down.finish(reset=not self.request_ended)
        if self.up is not None:
            self.up.close()
        self.body = []
        self.relay.exchanges.discard(self)
        # Streams closed before the call was done still point at it (stream.Ended).
        for side in (self.down, self.up):
            if side is not None and not side.open:
                side.exchange = ENDED
