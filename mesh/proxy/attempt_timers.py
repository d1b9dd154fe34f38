"""The relay's timers on a proxied call: route and per-try timeouts, stream idle, unrouted deadlines.

An attempt's route or per-try timeout fires here (on the relay's DeadlineQueue, armed by
:mod:`mesh.proxy.attempts`): past the call's deadline the call ends, before it a per-try
timeout is a failed attempt. The relay's tick checks the stream idle timeout and the
deadline of a call still waiting for the message it is routed on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import grpc

from mesh.proxy import frames as f
from mesh.proxy.retries import Retries
from mesh.routing import callpolicy as policy
from mesh.routing.decision import route_timeout

if TYPE_CHECKING:
    from mesh.proxy.downstream import Downstream


class Timers(Retries):
    """What the relay does when a call's time runs out."""

    def _expired(self) -> None:
        self._timer = None
        if self.done:
            return
        overall = self.deadline is not None and self.relay.loop.time() >= self.deadline - 1e-3
        if self.up is not None:
            self.up.reset(f.CANCEL)
        # A timeout is the upstream's failure only when it had the whole request: one
        # that is waiting for the client's message is not slow, the client is; nor is
        # one still pending (never sent: it waited for a connection).
        blame = self.request_ended and self.pending is None
        if overall:
            self._end_attempt(grpc.StatusCode.DEADLINE_EXCEEDED, blame=blame)
            self._give_up(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "deadline exceeded" if blame else "deadline exceeded before the request ended",
            )
            return
        self._failed_attempt(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "per-try timeout",
            connection_failure=False,
            blame=blame,
        )

    def check_timers(self, now: float, stream_idle: float) -> None:
        """The relay's tick (gateway/relay/relay.py): the stream idle timeout, and the
        deadline of a call still waiting for the message it is routed on."""
        if self.done:
            # Answered, its response still queued for a client that does not read.
            if stream_idle and now - self.active >= stream_idle and self.down.open:
                self.down.reset(f.CANCEL)
            return
        if stream_idle and now - self.active >= stream_idle:
            self._timed_out(f"stream idle for {stream_idle:g}s")
            return
        if self.decision is None and not self.internal:
            if not self._deadline_known:
                self._deadline_known = True
                self.deadline = self._unrouted_deadline()
            if self.deadline is not None and now >= self.deadline:
                self._timed_out("deadline exceeded before the request message arrived")

    def _unrouted_deadline(self) -> float | None:
        """For a call waiting for the first message it is routed on: the client's
        deadline and the route's timeout, from the first byte. Looked up on the relay's
        tick, not per call: most calls are routed before the first tick."""
        timeout = route_timeout(
            self.relay.state.clusters,
            self.path,
            self.authority.decode("latin-1"),
            policy.routing_metadata(self.headers),
            cast("Downstream", self.down.conn).local_port,
        )
        return policy.call_deadline(self.begun, policy.client_timeout(self.headers), timeout)
