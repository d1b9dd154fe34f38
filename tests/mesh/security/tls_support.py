"""Test helpers: a TLS server that reports who called it, and a clock the test moves."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
from cryptography import x509

from mesh.security.peer import peer_from_context
from mesh.server.app import ServerSettings, Service, Serving, start_server

WHO = "/meshtest.Who/Am"


class FakeClock:
    """Starts at the real time (TLS peers check validity against it) and moves on demand."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


async def _who(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    peer = peer_from_context(context)
    return (peer.spiffe_id or "anonymous").encode()


def who_service() -> Service:
    handler = grpc.method_handlers_generic_handler(
        "meshtest.Who", {"Am": grpc.unary_unary_rpc_method_handler(_who)}
    )
    return Service("meshtest.Who", lambda server: server.add_generic_rpc_handlers([handler]))


@asynccontextmanager
async def tls_server(
    credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    services: Sequence[Service] = (),
) -> AsyncIterator[Serving]:
    serving = await start_server(
        ServerSettings(),
        [who_service(), *services],
        interceptors=interceptors,
        credentials=credentials,
    )
    try:
        yield serving
    finally:
        await serving.drain(grace=0)


async def call_who(channel: grpc.aio.Channel, **kwargs: Any) -> str:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(WHO)
    reply = await method(b"", timeout=10, **kwargs)
    return reply.decode()


def served_serial(port: int, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, tmp: Any) -> int:
    """The serial of the certificate a TLS server presents to a new connection."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    cert_file, key_file = tmp / "c.pem", tmp / "k.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(["h2"])
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
