"""A worker for sidecar tests: echoes who the sidecar said called, can be slow, has health."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from mesh.proxy.inbound import PEER_HEADER
from mesh.server.app import Service

ECHO = "/meshtest.Worker/Echo"
SLOW = "/meshtest.Worker/Slow"


class Worker:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        # Every value the worker got: a forged one beside the sidecar's would show.
        peers = [str(v) for k, v in context.invocation_metadata() or () if k == PEER_HEADER]
        return ",".join(peers or ["anonymous"]).encode() + b"|" + request

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.started += 1
        await self.release.wait()
        return b"done:" + request

    def service(self) -> Service:
        handler = grpc.method_handlers_generic_handler(
            "meshtest.Worker",
            {
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
                "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            },
        )
        return Service("meshtest.Worker", lambda server: server.add_generic_rpc_handlers([handler]))
