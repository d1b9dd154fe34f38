"""Inbound forwarding: every call to the sidecar goes to its worker as raw bytes, under a limit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from gateway.methods import lookup
from mesh.errors import ResourceExhausted
from mesh.security.peer import peer_from_context
from mesh.server.app import DEFAULT_MAX_MESSAGE_BYTES
from mesh.server.sidecar_secret import HEADER as SECRET_HEADER
from mesh.telemetry.propagation import inject

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[bytes, bytes]
#: The verified SPIFFE id of the caller, for the worker (Istio's XFCC, reduced to the URI).
PEER_HEADER = "x-meshserve-peer"
#: Headers only the sidecar sets: a caller's copies are dropped, never forwarded.
_SET_HERE = frozenset({PEER_HEADER, SECRET_HEADER})
#: Metadata the transport owns; grpc sets these itself on the upstream call.
_HOP_BY_HOP = frozenset({"user-agent", "te", "content-type", "host", "connection"})
#: The sidecar answers these itself (its health mirrors the worker's).
_OWN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def forwardable(key: str) -> bool:
    return not (key.startswith(":") or key.startswith("grpc-") or key in _HOP_BY_HOP)


class ConcurrencyLimit:
    """At most ``limit`` calls at once (None: unlimited); refuses rather than queues.

    Refusing at once is Envoy's circuit-breaker behaviour: the caller (the gateway) retries
    on another endpoint instead of waiting behind a saturated worker.
    """

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"concurrency limit must be >= 1, got {limit}")
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.limit is not None and self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class Forwarder(grpc.GenericRpcHandler):
    """A generic handler that relays each call to the worker without decoding it.

    Mesh methods are relayed with their real kind (unary or streaming, from the compiled
    descriptors); other methods are relayed as unary calls.
    """

    def __init__(
        self,
        app_address: str,
        limit: ConcurrencyLimit,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        app_secret: str | None = None,
    ) -> None:
        self.app_address = app_address
        self.limit = limit
        #: Sent on every call to the worker, the sidecar's own included (health, load):
        #: a worker on a TCP port serves only calls carrying its secret.
        self.app_metadata: tuple[tuple[str, str], ...] = (
            ((SECRET_HEADER, app_secret),) if app_secret is not None else ()
        )
        self.channel = grpc.aio.insecure_channel(
            app_address,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                # A failed forward is the caller's to retry (on another endpoint).
                ("grpc.enable_retries", 0),
            ],
        )

    async def close(self) -> None:
        await self.channel.close()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        path = handler_call_details.method
        if path.startswith(_OWN_SERVICES):
            return None
        info = lookup(path)
        client_streaming = info is not None and info.client_streaming
        server_streaming = info is not None and info.server_streaming
        if client_streaming and server_streaming:
            return grpc.stream_stream_rpc_method_handler(self._streaming(path, "stream_stream"))
        if client_streaming:
            return grpc.stream_unary_rpc_method_handler(self._unary(path, "stream_unary"))
        if server_streaming:
            return grpc.unary_stream_rpc_method_handler(self._streaming(path, "unary_stream"))
        return grpc.unary_unary_rpc_method_handler(self._unary(path, "unary_unary"))

    def _metadata(self, context: Context) -> list[tuple[str, str | bytes]]:
        metadata: list[tuple[str, str | bytes]] = [
            (k, v)
            for k, v in (context.invocation_metadata() or ())
            if forwardable(k) and k not in _SET_HERE
        ]
        metadata.extend(self.app_metadata)
        peer = peer_from_context(context)
        if peer.spiffe_id is not None:
            metadata.append((PEER_HEADER, peer.spiffe_id))
        # The current span (the sidecar's server span) becomes the worker's parent.
        return inject(metadata)

    def _acquire(self) -> None:
        if not self.limit.try_acquire():
            raise ResourceExhausted(
                f"the sidecar's concurrency limit of {self.limit.limit} calls is reached"
            )

    def _call(self, path: str, kind: str, request: Any, context: Context) -> Any:
        factory: Any = {
            "unary_unary": self.channel.unary_unary,
            "unary_stream": self.channel.unary_stream,
            "stream_unary": self.channel.stream_unary,
            "stream_stream": self.channel.stream_stream,
        }[kind]
        return factory(path)(
            request, metadata=self._metadata(context), timeout=context.time_remaining()
        )

    async def _relay_trailers(self, upstream: Any, context: Context) -> None:
        trailers = await upstream.trailing_metadata()
        context.set_trailing_metadata(tuple((k, v) for k, v in (trailers or ()) if forwardable(k)))

    async def _abort(self, error: grpc.aio.AioRpcError, context: Context) -> None:
        trailers = tuple((k, v) for k, v in (error.trailing_metadata() or ()) if forwardable(k))
        await context.abort(error.code(), error.details() or "", trailing_metadata=trailers)

    def _unary(self, path: str, kind: str) -> Callable[[Any, Context], Any]:
        async def handler(request: Any, context: Context) -> bytes:
            self._acquire()
            try:
                upstream = self._call(path, kind, request, context)
                try:
                    response: bytes = await upstream
                except grpc.aio.AioRpcError as error:
                    await self._abort(error, context)
                    raise  # unreachable: abort raises
                initial = await upstream.initial_metadata()
                await context.send_initial_metadata(
                    tuple((k, v) for k, v in (initial or ()) if forwardable(k))
                )
                await self._relay_trailers(upstream, context)
                return response
            finally:
                self.limit.release()

        return handler

    def _streaming(self, path: str, kind: str) -> Callable[[Any, Context], AsyncIterator[bytes]]:
        async def handler(request: Any, context: Context) -> AsyncIterator[bytes]:
            self._acquire()
            try:
                upstream = self._call(path, kind, request, context)
                try:
                    async for message in upstream:
                        yield message
                except grpc.aio.AioRpcError as error:
                    await self._abort(error, context)
                await self._relay_trailers(upstream, context)
            finally:
                self.limit.release()

        return handler
