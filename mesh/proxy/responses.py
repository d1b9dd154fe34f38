"""The response path of a proxied call: upstream headers, data and trailers to the client.

A unary response is held back until its trailers (up to ``HOLD_LIMIT``) so that an
upstream that fails before finishing it can still be retried; a committed response goes
to the client with the call's ``x-request-id`` and the route's response header edits. An
upstream's trailers-only failure, reset or lost connection is either retried
(:mod:`mesh.proxy.retries`) or forwarded as the call's status.
"""

from __future__ import annotations

import grpc

from mesh.proxy import frames as f
from mesh.proxy.call_routing import Routing
from mesh.proxy.connection import STREAM_WINDOW
from mesh.proxy.grpc_status import (
    message_of,
    status_of,
)
from mesh.proxy.hpack_codec import Header
from mesh.proxy.stream import Side
from mesh.routing import headers as md

#: A unary response is held back up to this many bytes until its trailers (then it is
#: forwarded and the call committed): under half the stream window the relay advertises
#: upstream, so the upstream never waits for credit the relay gives only on forwarding.
HOLD_LIMIT = STREAM_WINDOW // 2


class Responses(Routing):
    """What the upstream sends back, and what the client is sent of it."""

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
