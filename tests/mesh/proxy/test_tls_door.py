"""A TLS listener's door against a client that starts handshakes and never finishes them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from mesh.proxy.relay import Relay
from mesh.routing.limits import RelayLimits
from mesh.routing.state import GatewayState
from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.security.rotation import CertificateSource

TD = "cluster.local"
#: A TLS record header announcing a ClientHello that never comes.
STALLED_HELLO = b"\x16\x03\x01\x02\x00"


@pytest.fixture
async def door() -> AsyncIterator[tuple[int, CertificateSource]]:
    """A relay's mutual-TLS listener (no upstreams: the sidecar health path answers nothing,
    a call is refused UNIMPLEMENTED by the relay itself, which proves a TLS session)."""
    ca = CertificateAuthority.create(TD)
    server = CertificateSource(ca, WorkloadIdentity(TD, "meshserve", "inference"))
    limits = RelayLimits(max_connections_per_source=4, request_headers_timeout=1.0)
    relay = Relay(GatewayState(), internal_address=None, limits=limits)
    port = await relay.start("127.0.0.1", 0, tls=server.ssl_server_context())
    try:
        yield port, CertificateSource(ca, WorkloadIdentity(TD, "meshserve", "gateway"))
    finally:
        await relay.drain(0)


async def stall(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(STALLED_HELLO)
    await writer.drain()
    return reader, writer


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except ConnectionError:
        return True  # closed with the client's bytes unread: a reset
    except TimeoutError:
        return False


async def test_handshakes_in_progress_count_against_the_source(
    door: tuple[int, CertificateSource],
) -> None:
    """Each stalled handshake held ~300 KB of the relay's memory for the stdlib's 60 s
    handshake timeout, uncounted: per-source limits began after the handshake, so 2000
    stalled connections from one address held 2000 sockets and 600 MB."""
    port, client = door
    held = [await stall(port) for _ in range(4)]
    reader, writer = await stall(port)
    assert await closed_within(reader, 5), "a 5th handshake from the source was not refused"
    writer.close()
    # A mesh client is still served: its calls reach the relay over TLS.
    async with grpc.aio.secure_channel(
        f"localhost:{port}", client.channel_credentials()
    ) as channel:
        held_reader = held[0][0]
        for _, w in held:
            w.close()
        assert await closed_within(held_reader, 5)
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/meshtest.Worker/Echo"
        )
        with pytest.raises(grpc.aio.AioRpcError) as answered:
            await method(b"hi", timeout=10)
        assert answered.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_a_stalled_handshake_is_closed_at_the_request_headers_timeout(
    door: tuple[int, CertificateSource],
) -> None:
    port, _ = door
    reader, writer = await stall(port)
    try:
        assert await closed_within(reader, 5), "a stalled handshake outlived 5 s (timeout 1 s)"
    finally:
        writer.close()
