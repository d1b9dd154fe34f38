"""Interceptors wrap each method's handler once, not on every call (issue 17)."""

from __future__ import annotations

from typing import Any

import grpc

from mesh.server.interceptor import Rewrapped


def handler() -> grpc.RpcMethodHandler[Any, Any]:
    async def behaviour(request: Any, context: Any) -> Any:
        return request

    return grpc.unary_unary_rpc_method_handler(behaviour)


def test_each_method_and_handler_is_wrapped_once() -> None:
    made: list[str] = []

    def wrap(method: str, h: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        made.append(method)
        return handler()

    cache = Rewrapped(wrap)
    a, b = handler(), handler()
    first = cache.get("/s/A", a)
    assert cache.get("/s/A", a) is first
    # The same handler under another method (a catch-all generic handler) is its own entry.
    assert cache.get("/s/B", a) is not first
    assert cache.get("/s/A", b) is not first
    assert made == ["/s/A", "/s/B", "/s/A"]


def test_stays_bounded_when_handlers_are_made_per_call() -> None:
    cache = Rewrapped(lambda method, h: h)
    for _ in range(Rewrapped.LIMIT * 3):
        fresh = handler()
        assert cache.get("/s/A", fresh) is fresh
    assert len(cache._wrapped) <= Rewrapped.LIMIT
