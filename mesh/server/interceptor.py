"""The one place where domain errors become gRPC statuses."""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
import grpc.aio

from mesh.errors import MeshError, clamp_message

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # grpc's handler type is generic only in its stubs
    Continuation = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status, message and trailers a call that raised ``exc`` ends with.

    Shared by this interceptor and the worker's HTTP/2 front (mesh/server/h2_front.py),
    so a call gets the same answer whichever of them served it.
    """
    if isinstance(exc, MeshError):
        return exc.code, clamp_message(exc.message), exc.trailers
    # Anything else is a bug: log it whole here, tell the client only a reference
    # it can quote, never the exception text (it may hold paths or secrets).
    ref = uuid.uuid4().hex[:12]
    log.error("unhandled error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref})", ()


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    code, message, trailers = status_for(exc)
    await context.abort(code, message, trailing_metadata=trailers)


def _wrap_unary(
    behaviour: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context)

    return handler


def _wrap_streaming(
    behaviour: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def handler(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            result = behaviour(request, context)
            if inspect.isawaitable(result):
                # A coroutine that streams with ``context.write`` (grpc_health's Watch does).
                await result
            else:
                async for item in result:
                    yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context)

    return handler


Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    unary: Callable[[Behaviour], Behaviour],
    streaming: Callable[[Behaviour], Behaviour],
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with its behaviour passed through ``unary`` or ``streaming``.

    ``unary`` wraps calls with one response (unary-unary, stream-unary),
    ``streaming`` those with a response stream. Every server interceptor that
    acts around the call (errors, authorization, telemetry) builds on this.
    """
    # grpc's stubs type the behaviours as sync callables; on an aio server
    # they are coroutine functions and async generators (or coroutines that
    # stream with ``context.write``).
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(cast(Any, handler.unary_unary)), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            unary(cast(Any, handler.stream_unary)), **kwargs
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            streaming(cast(Any, handler.unary_stream)), **kwargs
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            streaming(cast(Any, handler.stream_stream)), **kwargs
        )
    return handler


class Rewrapped:
    """Each (method, handler) wrapped once, not on every call.

    A server's handlers are long-lived (one object per method), and rewrapping builds
    closures and a new handler: work every call repeated for the same result, on the
    hot path of every RPC (issue 17). ``wrap`` must depend only on the method and the
    handler. Bounded: a server whose handlers are made per call (none of ours) would
    only refill it.
    """

    LIMIT = 1024

    def __init__(
        self,
        wrap: Callable[[str, grpc.RpcMethodHandler[Any, Any]], grpc.RpcMethodHandler[Any, Any]],
    ) -> None:
        self._wrap = wrap
        # Keyed by id: handlers need not be hashable; the entry keeps the handler alive,
        # so its id cannot be reused while the entry exists, and the identity check
        # below makes a stale entry harmless anyway.
        self._wrapped: dict[
            tuple[str, int],
            tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]],
        ] = {}

    def get(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        key = (method, id(handler))
        entry = self._wrapped.get(key)
        if entry is not None and entry[0] is handler:
            return entry[1]
        if len(self._wrapped) >= self.LIMIT:
            self._wrapped.clear()
        wrapped = self._wrap(method, handler)
        self._wrapped[key] = (handler, wrapped)
        return wrapped


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps :class:`MeshError` to its status and anything else to a safe INTERNAL."""

    def __init__(self) -> None:
        self._handlers = Rewrapped(
            lambda method, handler: rewrap(handler, _wrap_unary, _wrap_streaming)
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._handlers.get(handler_call_details.method, handler)
