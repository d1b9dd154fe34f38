"""The byte proxy: routes every mesh method, forwards raw messages, retries on ring successors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace

from gateway.channels import ChannelPool
from mesh.balance.cluster import Cluster, ClusterMap
from mesh.balance.endpoints import Endpoint
from mesh.config.destination_rule import UNLIMITED
from mesh.errors import DeadlineExceeded, Unavailable
from mesh.routing import headers as md
from mesh.routing.decision import RequestInfo, RouteDecision, decide
from mesh.routing.methods import MethodInfo, lookup
from mesh.routing.services import host_for_method
from mesh.routing.state import GatewayState
from mesh.routing.weights import percent_hit
from mesh.telemetry.interceptors import annotate
from mesh.telemetry.metrics import MeshMetrics, labels
from mesh.telemetry.propagation import inject

log = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"
SHADOW = "x-meshserve-shadow"
#: Metadata the transport owns; gRPC sets these itself on the upstream call.
_HOP_BY_HOP = frozenset({"user-agent", "te", "content-type", "host", "connection"})

Context = grpc.aio.ServicerContext[bytes, bytes]


def _forwardable(key: str) -> bool:
    return not (key.startswith(":") or key.startswith("grpc-") or key in _HOP_BY_HOP)


def _forwarded(metadata: Any) -> tuple[tuple[str, Any], ...]:
    """The entries of ``metadata`` (None or pairs) that cross the proxy."""
    return tuple((m[0], m[1]) for m in (metadata or ()) if _forwardable(m[0]))


def _connection_failure(error: grpc.aio.AioRpcError) -> bool:
    """The upstream never received the call (safe to retry even a non-idempotent one)."""
    details = (error.details() or "").lower()
    return error.code() is grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details or "connection refused" in details
    )


@dataclass
class _Call:
    """One proxied call: the decision and what every attempt shares."""

    info: MethodInfo
    decision: RouteDecision
    cluster: Cluster
    metadata: tuple[tuple[str, str | bytes], ...]
    #: Loop time by which the whole call must end; None: no deadline.
    deadline: float | None

    @property
    def key(self) -> str | None:
        """The hash key, which the load tracker counts in-flight requests under."""
        return self.decision.hash_key.key if self.decision.hash_key else None

    def timeout(self, per_try: float | None) -> float | None:
        """Seconds the next attempt may take, or raises when the deadline has passed."""
        remaining = None
        if self.deadline is not None:
            remaining = self.deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise DeadlineExceeded(f"deadline exceeded routing to {self.decision.target}")
        if per_try is None:
            return remaining
        return per_try if remaining is None else min(per_try, remaining)


class Proxy(grpc.GenericRpcHandler):
    """A generic handler for every mesh method; unknown methods fall through to UNIMPLEMENTED."""

    def __init__(
        self,
        state: GatewayState,
        channels: ChannelPool,
        *,
        request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        metrics: MeshMetrics | None = None,
    ) -> None:
        self.state = state
        #: Retries and ejections are counted here when set (requests by the interceptor).
        self.metrics = metrics
        self.channels = channels
        self._request_id = request_id
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # -- handler table ----------------------------------------------------------------------

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        path = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is None:
            info = lookup(path)
            if info is None:
                return None
            handler = self._handlers[path] = self._handler(info)
        return handler

    def _handler(self, info: MethodInfo) -> grpc.RpcMethodHandler[bytes, bytes]:
        # No serializers: requests and responses stay the bytes they arrived as.
        if not info.client_streaming and not info.server_streaming:

            async def unary_unary(request: bytes, context: Context) -> bytes:
                return await self._unary_unary(info, request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary)
        if not info.client_streaming:

            async def unary_stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
                async for item in self._unary_stream(info, request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream)
        if not info.server_streaming:

            async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> bytes:
                return await self._stream_unary(info, requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        async def stream_stream(
            requests: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[bytes]:
            async for item in self._stream_stream(info, requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream)

    # -- the decision -------------------------------------------------------------------------

    def needs_message(self, clusters: ClusterMap, path: str) -> bool:
        """Whether this method's host hashes on request fields (then a client stream's
        first message is read before routing)."""
        config = clusters.config
        host = host_for_method(path)
        rule = config.destination_rule(host) if host else None
        return rule is not None and bool(rule.extensions.hash_fields)

    async def _prepare(self, info: MethodInfo, context: Context, message: bytes | None) -> _Call:
        clusters = self.state.clusters
        raw: list[tuple[str, str | bytes]] = list(_forwarded(context.invocation_metadata()))
        if not any(k == REQUEST_ID for k, _ in raw):
            raw.append((REQUEST_ID, self._request_id()))
        text = md.normalise(raw)
        binary = tuple((k, v) for k, v in raw if isinstance(v, bytes))
        decision = decide(clusters, RequestInfo(info.path, text, message=message), self.state.rng)
        if not decision.candidates:
            raise Unavailable(
                f"no healthy endpoint for host {decision.host!r} subset {decision.subset!r}"
            )
        cluster = clusters.cluster(decision.host, decision.subset)
        limit = cluster.policy.connection_pool.http2_max_requests
        if limit < UNLIMITED and self.state.tracker.total(cluster.healthy) >= limit:
            raise Unavailable(
                f"{decision.target} has {limit} requests in flight (connectionPool.http.http2MaxRequests)"
            )
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        budget = min(x for x in (remaining, decision.timeout, float("inf")) if x is not None)
        deadline = None if budget == float("inf") else loop.time() + budget
        # The current span (the gateway's, when tracing) becomes the upstream's parent.
        metadata = tuple(inject((*decision.metadata, *binary)))
        annotate(
            trace.get_current_span(),
            route=decision.route,
            destination=decision.target,
            hash_key=decision.hash_key.key if decision.hash_key else None,
        )
        call = _Call(info, decision, cluster, metadata, deadline)
        await self._inject_fault(call, context)
        return call

    async def _inject_fault(self, call: _Call, context: Context) -> None:
        fault = call.decision.fault
        if fault is None:
            return
        if fault.delay is not None and percent_hit(fault.delay.percentage, self.state.rng):
            await asyncio.sleep(fault.delay.fixed_delay)
        if fault.abort is not None and percent_hit(fault.abort.percentage, self.state.rng):
            await context.abort(fault.abort.status, f"fault injected by {call.decision.route}")

    def _record(
        self,
        call: _Call,
        endpoint: Endpoint,
        code: grpc.StatusCode,
        *,
        connection_failure: bool = False,
    ) -> None:
        outliers = call.cluster.outliers
        if outliers is not None and outliers.record(
            endpoint.address, code, call.cluster.healthy, connection_failure=connection_failure
        ):
            log.warning(
                "ejected %s from %s after %s", endpoint.address, call.decision.target, code.name
            )
            if self.metrics is not None:
                self.metrics.ejected(call.decision.target, endpoint.address)

    def _record_error(self, call: _Call, endpoint: Endpoint, error: grpc.aio.AioRpcError) -> None:
        self._record(call, endpoint, error.code(), connection_failure=_connection_failure(error))

    def _count_retry(self, call: _Call) -> None:
        if self.metrics is not None:
            self.metrics.retried(
                labels(route=call.decision.route, destination=call.decision.target)
            )

    def _retryable(self, call: _Call, error: grpc.aio.AioRpcError, attempt: int) -> bool:
        retries = call.decision.retries
        if attempt >= min(retries.attempts, len(call.decision.candidates) - 1):
            return False
        connection = _connection_failure(error)
        if connection and retries.retries_connection_failures():
            return True
        return call.info.idempotent and retries.should_retry(
            error.code(), connection_failure=connection
        )

    async def _send_headers(self, call: _Call, context: Context, upstream: Any) -> None:
        pairs = _forwarded(await upstream.initial_metadata())
        for ops in call.decision.response_headers:
            text = md.apply(ops, tuple((k, v) for k, v in pairs if isinstance(v, str)))
            pairs = (*text, *((k, v) for k, v in pairs if not isinstance(v, str)))
        # Sending headers on their own costs a separate write; with nothing to forward,
        # grpc sends its own with the first message.
        if pairs:
            await context.send_initial_metadata(pairs)

    async def _fail(self, context: Context, error: grpc.aio.AioRpcError) -> None:
        await context.abort(
            error.code(),
            error.details() or "",
            trailing_metadata=_forwarded(error.trailing_metadata()),
        )

    def _mirror(self, call: _Call, request: bytes) -> None:
        """Fire-and-forget copy of a unary call; its outcome is never seen by the client."""
        dest = call.decision.mirror
        if dest is None or not percent_hit(call.decision.mirror_percentage, self.state.rng):
            return
        cluster = self.state.clusters.cluster(dest.host, dest.subset or "")
        key = call.key
        pick = cluster.pick(key, self.state.rng)
        if not pick.candidates:
            return
        method = self.channels.method(pick.candidates[0].address, call.info.path, "unary_unary")
        metadata = (*call.metadata, (SHADOW, "1"))

        async def shadow() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, DeadlineExceeded):
                await method(request, metadata=metadata, timeout=call.timeout(None))

        task = asyncio.get_running_loop().create_task(shadow())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the four call kinds -------------------------------------------------------------------

    async def _unary_unary(self, info: MethodInfo, request: bytes, context: Context) -> bytes:
        call = await self._prepare(info, context, request)
        self._mirror(call, request)
        decision = call.decision
        key = call.key
        per_try = decision.retries.per_try_timeout
        tracker = self.state.tracker
        for attempt, endpoint in enumerate(decision.candidates):
            method = self.channels.method(endpoint.address, info.path, "unary_unary")
            annotate(trace.get_current_span(), endpoint=endpoint.address, retry_count=attempt)
            tracker.start(endpoint.address, key)
            try:
                upstream = method(request, metadata=call.metadata, timeout=call.timeout(per_try))
                response: bytes = await upstream
            except grpc.aio.AioRpcError as error:
                connection = _connection_failure(error)
                self._record(call, endpoint, error.code(), connection_failure=connection)
                if self._retryable(call, error, attempt):
                    log.info(
                        "retrying %s on the next endpoint after %s from %s",
                        info.path,
                        error.code().name,
                        endpoint.address,
                    )
                    self._count_retry(call)
                    continue
                await self._fail(context, error)
            finally:
                tracker.finish(endpoint.address, key)
            self._record(call, endpoint, grpc.StatusCode.OK)
            await self._send_headers(call, context, upstream)
            context.set_trailing_metadata(_forwarded(await upstream.trailing_metadata()))
            return response
        raise AssertionError("unreachable: the last attempt either returns or aborts")

    async def _unary_stream(
        self, info: MethodInfo, request: bytes, context: Context
    ) -> AsyncIterator[bytes]:
        call = await self._prepare(info, context, request)
        decision = call.decision
        key = call.key
        tracker = self.state.tracker
        for attempt, endpoint in enumerate(decision.candidates):
            method = self.channels.method(endpoint.address, info.path, "unary_stream")
            upstream = method(request, metadata=call.metadata, timeout=call.timeout(None))
            started = False
            tracker.start(endpoint.address, key)
            try:
                async for item in upstream:
                    if not started:
                        started = True
                        await self._send_headers(call, context, upstream)
                    yield item
            except grpc.aio.AioRpcError as error:
                self._record_error(call, endpoint, error)
                # Only before the first message: after it, the client has seen a partial stream.
                if not started and self._retryable(call, error, attempt):
                    self._count_retry(call)
                    continue
                await self._fail(context, error)
            finally:
                tracker.finish(endpoint.address, key)
                upstream.cancel()
            self._record(call, endpoint, grpc.StatusCode.OK)
            if not started:
                await self._send_headers(call, context, upstream)
            context.set_trailing_metadata(_forwarded(await upstream.trailing_metadata()))
            return

    async def _open_stream(
        self, info: MethodInfo, requests: AsyncIterator[bytes], context: Context
    ) -> tuple[_Call, AsyncIterator[bytes]]:
        """Routes a client stream, reading its first message first when the host hashes on
        request fields; the message is then sent on unchanged."""
        first: bytes | None = None
        if self.needs_message(self.state.clusters, info.path):
            first = await anext(aiter(requests), None)
        call = await self._prepare(info, context, first)

        async def replay() -> AsyncIterator[bytes]:
            if first is not None:
                yield first
            async for item in requests:
                yield item

        return call, replay()

    async def _stream_unary(
        self, info: MethodInfo, requests: AsyncIterator[bytes], context: Context
    ) -> bytes:
        # A client stream cannot be replayed, so it is never retried.
        call, replay = await self._open_stream(info, requests, context)
        endpoint = call.decision.candidates[0]
        key = call.key
        method = self.channels.method(endpoint.address, info.path, "stream_unary")
        upstream = method(replay, metadata=call.metadata, timeout=call.timeout(None))
        self.state.tracker.start(endpoint.address, key)
        try:
            response: bytes = await upstream
        except grpc.aio.AioRpcError as error:
            self._record_error(call, endpoint, error)
            await self._fail(context, error)
        finally:
            self.state.tracker.finish(endpoint.address, key)
            upstream.cancel()
        self._record(call, endpoint, grpc.StatusCode.OK)
        await self._send_headers(call, context, upstream)
        return response

    async def _stream_stream(
        self, info: MethodInfo, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        call, replay = await self._open_stream(info, requests, context)
        endpoint = call.decision.candidates[0]
        key = call.key
        method = self.channels.method(endpoint.address, info.path, "stream_stream")
        upstream = method(replay, metadata=call.metadata, timeout=call.timeout(None))
        self.state.tracker.start(endpoint.address, key)
        started = False
        try:
            async for item in upstream:
                if not started:
                    started = True
                    await self._send_headers(call, context, upstream)
                yield item
        except grpc.aio.AioRpcError as error:
            self._record_error(call, endpoint, error)
            await self._fail(context, error)
        finally:
            self.state.tracker.finish(endpoint.address, key)
            upstream.cancel()
        self._record(call, endpoint, grpc.StatusCode.OK)
        if not started:
            await self._send_headers(call, context, upstream)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
