"""A tiny traced service for telemetry tests: answers, or relays to an upstream first.

Run as a process: ``python -m tests.mesh.telemetry.relay --name B --spans FILE
[--upstream HOST:PORT]``; prints ``listening on PORT`` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence

import grpc
import grpc.aio

from mesh.errors import PermissionDenied
from mesh.server.app import ServerSettings, Service, Serving, serve_until_signal, start_server
from mesh.telemetry.interceptors import TelemetryClientInterceptor, TelemetryServerInterceptor
from mesh.telemetry.setup import Telemetry, TelemetrySettings, setup

CALL = "/meshtest.Relay/Call"
DENY = "/meshtest.Relay/Deny"
log = logging.getLogger("relay")


def relay_service(name: str, telemetry: Telemetry, upstream: str | None) -> Service:
    channel = (
        grpc.aio.insecure_channel(upstream, interceptors=[TelemetryClientInterceptor(telemetry)])
        if upstream
        else None
    )

    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        log.warning("%s handling a call", name)
        if channel is None:
            return name.encode()
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(CALL)
        return name.encode() + b">" + await method(request, timeout=10)

    async def deny(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise PermissionDenied("not you")

    handler = grpc.method_handlers_generic_handler(
        "meshtest.Relay",
        {
            "Call": grpc.unary_unary_rpc_method_handler(call),
            "Deny": grpc.unary_unary_rpc_method_handler(deny),
        },
    )
    return Service("meshtest.Relay", lambda server: server.add_generic_rpc_handlers([handler]))


async def start_relay(name: str, telemetry: Telemetry, upstream: str | None = None) -> Serving:
    return await start_server(
        ServerSettings(),
        [relay_service(name, telemetry, upstream)],
        interceptors=[TelemetryServerInterceptor(telemetry)],
    )


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--spans", required=True)
    parser.add_argument("--upstream")
    args = parser.parse_args(argv)
    telemetry = setup(
        TelemetrySettings.from_env(
            {"MESHSERVE_TRACES": f"file:{args.spans}"}, service_name=args.name
        )
    )
    serving = await start_relay(args.name, telemetry, args.upstream)
    print(f"listening on {serving.port}", flush=True)
    try:
        await serve_until_signal(serving)
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    asyncio.run(_main())
