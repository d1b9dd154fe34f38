"""A server interceptor that runs an async check before every call's handler."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from mesh.server.interceptor import Rewrapped, rewrap

if TYPE_CHECKING:
    from mesh.server.interceptor import Continuation

Context = grpc.aio.ServicerContext[Any, Any]
#: Receives the method path and the call's context; raises a MeshError to refuse the call.
Check = Callable[[str, Context], Awaitable[None]]


def _unary(check: Check, method: str, behaviour: Any) -> Any:
    async def handler(request: Any, context: Context) -> Any:
        await check(method, context)
        return await behaviour(request, context)

    return handler


def _streaming(check: Check, method: str, behaviour: Any) -> Any:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        await check(method, context)
        result = behaviour(request, context)
        if inspect.isawaitable(result):  # streams with context.write (grpc_health's Watch)
            await result
        else:
            async for item in result:
                yield item

    return handler


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Runs ``check`` inside each call, where the peer's auth context is known.

    ``intercept_service`` only sees the method and metadata, not the TLS peer, so the check
    wraps the handler. Install it after ``ErrorMappingInterceptor`` (as ``start_server``
    does with extra interceptors): domain errors the check raises then become statuses.
    """

    def __init__(self, check: Check) -> None:
        self._check = check
        self._handlers = Rewrapped(self._wrap)

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        check = self._check
        return rewrap(
            handler,
            lambda behaviour: _unary(check, method, behaviour),
            lambda behaviour: _streaming(check, method, behaviour),
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._handlers.get(handler_call_details.method, handler)
