"""gRPC interceptors that trace and measure every call: server side and client side."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from mesh.errors import MeshError
from mesh.routing import headers as md
from mesh.server.interceptor import Rewrapped, rewrap
from mesh.telemetry.metrics import labels
from mesh.telemetry.propagation import extract, inject
from mesh.telemetry.setup import Telemetry

if TYPE_CHECKING:
    from mesh.server.interceptor import Continuation

Context = grpc.aio.ServicerContext[Any, Any]

#: Span attribute keys beyond OpenTelemetry's RPC conventions.
MODEL_NAME = "meshserve.model.name"
MODEL_VERSION = "meshserve.model.version"
ENDPOINT = "meshserve.endpoint"
ROUTE = "meshserve.route"
DESTINATION = "meshserve.destination"
RETRY_COUNT = "meshserve.retry_count"
#: The consistent-hash key (``model/version`` when hashing on the request's model fields).
HASH_KEY = "meshserve.hash_key"
#: The call's ``x-request-id`` (Envoy tags it ``guid:x-request-id``): the id the gateway
#: returns in the response headers, so a client can find its call's spans by it.
REQUEST_ID = "meshserve.request_id"
#: Route and destination of the call being served, filled in by :func:`annotate` as the
#: proxy decides; each RPC runs in its own task, so each sees only its own.
_ROUTED: ContextVar[dict[str, str] | None] = ContextVar("meshserve_routed", default=None)

#: Metadata a client may set to name the model for telemetry (the gateway's routing keys).
#: Request headers recorded on every server span, by attribute.
SPAN_HEADERS = {
    "x-model-name": MODEL_NAME,
    md.MODEL_VERSION: MODEL_VERSION,
    md.REQUEST_ID: REQUEST_ID,
}


def split_method(path: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → (``pkg.Service``, ``Method``)."""
    service, _, method = path.lstrip("/").partition("/")
    return service, method


def rpc_attributes(path: str) -> dict[str, str]:
    service, method = split_method(path)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def annotate(
    span: Span,
    *,
    model_name: str | None = None,
    model_version: str | None = None,
    endpoint: str | None = None,
    route: str | None = None,
    destination: str | None = None,
    retry_count: int | None = None,
    hash_key: str | None = None,
) -> None:
    """Sets the mesh's attributes on a span (the proxy calls this as it decides)."""
    values: dict[str, str | int | None] = {
        MODEL_NAME: model_name,
        MODEL_VERSION: model_version,
        ENDPOINT: endpoint,
        ROUTE: route,
        DESTINATION: destination,
        RETRY_COUNT: retry_count,
        HASH_KEY: hash_key,
    }
    for key, value in values.items():
        if value is not None:
            span.set_attribute(key, value)
    routed = _ROUTED.get()
    if routed is not None:
        routed.update(labels(route=route, destination=destination))


def finish_span(span: Span, code: grpc.StatusCode, details: str | None) -> None:
    """Records a call's final status on its span (the caller ends the span)."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}".rstrip(": ")))


def _context_code(context: Context) -> grpc.StatusCode | None:
    # Typed as a StatusCode; grpc.aio may hand back the raw integer after an abort.
    code: object = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for candidate in grpc.StatusCode:
            if candidate.value[0] == code:
                return candidate
    return None


def server_span(
    tracer: Tracer,
    path: str,
    metadata: Sequence[tuple[str, str | bytes]],
    peer: str | None,
    request_id: str | None = None,
) -> tuple[Span, dict[str, str]]:
    """A SERVER span for one call (parented by the caller's ``traceparent``) and the
    call's metric labels: what every server-side hop records, the gateway's relay too
    (which passes the ``request_id`` it made when the caller sent none)."""
    attributes: dict[str, str] = rpc_attributes(path)
    if peer:
        attributes["net.sock.peer.addr"] = peer
    headers = {k: v for k, v in metadata if isinstance(v, str)}
    for header, key in SPAN_HEADERS.items():
        if headers.get(header):
            attributes[key] = headers[header]
    if request_id:
        attributes[REQUEST_ID] = request_id
    span = tracer.start_span(
        f"{attributes['rpc.service']}/{attributes['rpc.method']}",
        context=extract(metadata),
        kind=SpanKind.SERVER,
        attributes=attributes,
    )
    metric_labels = labels(method=path, model_version=headers.get(md.MODEL_VERSION) or None)
    return span, metric_labels


class TelemetryServerInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per call (parented by the caller's ``traceparent``) and request metrics.

    The span is current while the handler runs, so log records carry its trace id and
    outgoing calls made with :class:`TelemetryClientInterceptor` or :func:`inject` become
    its children.
    """

    def __init__(self, telemetry: Telemetry) -> None:
        self._tracer = telemetry.tracer
        self._metrics = telemetry.metrics
        self._handlers = Rewrapped(
            lambda path, handler: rewrap(
                handler,
                lambda behaviour: self._unary(path, behaviour),
                lambda behaviour: self._streaming(path, behaviour),
            )
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._handlers.get(handler_call_details.method, handler)

    def _start(self, path: str, context: Context) -> tuple[Span, dict[str, str]]:
        metadata = tuple(context.invocation_metadata() or ())
        return server_span(self._tracer, path, metadata, context.peer())

    def _end(
        self,
        span: Span,
        metric_labels: Mapping[str, str],
        context: Context,
        started: float,
        error: BaseException | None,
    ) -> None:
        details: str | None
        if isinstance(error, MeshError):
            code, details = error.code, error.message
        elif error is None or isinstance(error, grpc.aio.AbortError):
            code = _context_code(context) or grpc.StatusCode.OK
            details = context.details() if error is not None else None
        elif isinstance(error, asyncio.CancelledError):
            code, details = grpc.StatusCode.CANCELLED, "cancelled"
        else:
            code, details = grpc.StatusCode.INTERNAL, type(error).__name__
            span.record_exception(error)
        finish_span(span, code, details)
        span.end()
        self._metrics.finished(
            metric_labels, code.name, time.perf_counter() - started, _ROUTED.get()
        )

    def _unary(self, path: str, behaviour: Any) -> Any:
        async def handler(request: Any, context: Context) -> Any:
            span, metric_labels = self._start(path, context)
            _ROUTED.set({})
            self._metrics.started(metric_labels)
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                with trace.use_span(span, end_on_exit=False, record_exception=False):
                    return await behaviour(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end(span, metric_labels, context, started, error)

        return handler

    def _streaming(self, path: str, behaviour: Any) -> Any:
        async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
            span, metric_labels = self._start(path, context)
            _ROUTED.set({})
            self._metrics.started(metric_labels)
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                with trace.use_span(span, end_on_exit=False, record_exception=False):
                    result = behaviour(request, context)
                    if inspect.isawaitable(result):  # streams with context.write
                        await result
                    else:
                        async for item in result:
                            yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end(span, metric_labels, context, started, error)

        return handler


class TelemetryClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """A CLIENT span per outgoing call, its ``traceparent`` sent in the call's metadata.

    Pass to ``grpc.aio.insecure_channel(..., interceptors=[...])`` (or a secure channel).
    """

    def __init__(self, telemetry: Telemetry) -> None:
        self._tracer = telemetry.tracer
        # Calls end in grpc callbacks: keep the tasks that close their spans alive.
        self._pending: set[asyncio.Task[None]] = set()

    def _start(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[Span, grpc.aio.ClientCallDetails]:
        # Typed as str; grpc.aio passes the encoded path.
        method: str | bytes = cast(Any, details.method)
        path = method.decode() if isinstance(method, bytes) else method
        attributes = rpc_attributes(path)
        span = self._tracer.start_span(
            f"{attributes['rpc.service']}/{attributes['rpc.method']}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        metadata = inject(details.metadata, trace.set_span_in_context(span))
        new = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata),
            details.credentials,
            details.wait_for_ready,
        )
        return span, new

    def _watch(self, span: Span, call: grpc.aio.Call) -> None:
        async def finish() -> None:
            try:
                code = await call.code()
                details = await call.details()
            except asyncio.CancelledError:
                code, details = grpc.StatusCode.CANCELLED, "cancelled"
            finish_span(span, code, details)
            span.end()

        def done(_: object) -> None:
            task = asyncio.get_running_loop().create_task(finish())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(done)

    async def _intercept(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        """Every call kind alike: a span, the call with its ``traceparent``, the span
        ended when the call is. (grpc's four interfaces name the request parameter
        differently, so each keeps its own method.)"""
        span, details = self._start(client_call_details)
        call = await continuation(details, request)
        self._watch(span, call)
        return call

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request)

    async def intercept_stream_unary(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)

    async def intercept_stream_stream(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)
