"""Certificate rotation on a live TLS server: new connections get the new cert, old ones live on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
from pathlib import Path

import grpc.aio
import pytest
from cryptography import x509

from mesh.errors import InvalidArgument
from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.security.peer import PeerInfo, peer_from_ssl
from mesh.security.rotation import CertificateSource, FileIssuer
from tests.mesh.security.tls_support import FakeClock, call_who, served_serial, tls_server

TD = "cluster.local"
SERVER = WorkloadIdentity(TD, "meshserve", "inference")
CLIENT = WorkloadIdentity(TD, "meshserve", "gateway")
LIFETIME = dt.timedelta(minutes=30)
#: Short enough that a renewed certificate (valid from the fake time minus one minute of
#: skew allowance) is already valid on the real clock the TLS peers check.
SHORT = dt.timedelta(seconds=60)


def test_renews_only_after_two_thirds_of_the_lifetime() -> None:
    clock = FakeClock()
    ca = CertificateAuthority.create(TD, clock=clock)
    source = CertificateSource(ca, SERVER, lifetime=LIFETIME, clock=clock)
    first = source.current()
    clock.advance(LIFETIME * 0.6)
    assert source.current().serial == first.serial
    clock.advance(LIFETIME * 0.1)
    second = source.current()
    assert second.serial != first.serial
    assert second.not_after == clock.now + LIFETIME


def test_renew_fraction_is_validated() -> None:
    ca = CertificateAuthority.create(TD)
    with pytest.raises(InvalidArgument, match="renew_fraction"):
        CertificateSource(ca, SERVER, renew_fraction=1.0)


async def test_rotation_serves_the_new_cert_without_dropping_connections(tmp_path: Path) -> None:
    clock = FakeClock()
    ca = CertificateAuthority.create(TD, clock=clock)
    server_certs = CertificateSource(ca, SERVER, lifetime=SHORT, clock=clock)
    client_certs = CertificateSource(ca, CLIENT, lifetime=SHORT, clock=clock)
    rotated: list[int] = []
    server_certs.on_rotate(lambda cert: rotated.append(cert.serial))
    first = server_certs.current()
    client = client_certs.current()
    async with tls_server(server_certs.server_credentials()) as serving:
        target = f"localhost:{serving.port}"
        old = grpc.aio.secure_channel(target, client_certs.channel_credentials())
        try:
            assert await call_who(old) == CLIENT.uri
            assert (
                served_serial(
                    serving.port, client.ca_pem, client.cert_pem, client.key_pem, tmp_path
                )
                == first.serial
            )
            clock.advance(SHORT * 0.7)
            # The next handshake asks the source, which renews.
            new_serial = served_serial(
                serving.port, client.ca_pem, client.cert_pem, client.key_pem, tmp_path
            )
            assert new_serial != first.serial
            assert rotated == [new_serial]
            async with grpc.aio.secure_channel(target, client_certs.channel_credentials()) as new:
                assert await call_who(new) == CLIENT.uri
            # The connection made before the rotation still works.
            assert await call_who(old) == CLIENT.uri
        finally:
            await old.close()


def test_file_issuer_serves_replaced_files_at_renewal(tmp_path: Path) -> None:
    clock = FakeClock()
    ca = CertificateAuthority.create(TD, clock=clock)
    ca.issue(SERVER, lifetime=LIFETIME).save(tmp_path)
    source = CertificateSource(FileIssuer(tmp_path), SERVER, lifetime=LIFETIME, clock=clock)
    first = source.current()
    clock.advance(LIFETIME * 0.7)
    # Nothing replaced the files yet: the same certificate, no rotation reported.
    rotated: list[int] = []
    source.on_rotate(lambda cert: rotated.append(cert.serial))
    assert source.current().serial == first.serial and rotated == []
    replacement = ca.issue(SERVER, lifetime=LIFETIME)
    replacement.save(tmp_path)
    assert source.current().serial == replacement.serial
    assert rotated == [replacement.serial]
    with pytest.raises(
        InvalidArgument, match=re.escape("not spiffe://cluster.local/ns/meshserve/sa/gateway")
    ):
        FileIssuer(tmp_path).issue(CLIENT)


async def test_the_ssl_context_presents_the_current_certificate_and_follows_rotation() -> None:
    """What the gateway's relay dials sidecars with: mutual TLS over plain asyncio."""
    clock = FakeClock()
    ca = CertificateAuthority.create(TD, clock=clock)
    server_certs = CertificateSource(ca, SERVER, lifetime=SHORT, clock=clock)
    client_certs = CertificateSource(ca, CLIENT, lifetime=SHORT, clock=clock)
    first = client_certs.ssl_client_context()
    assert client_certs.ssl_client_context() is first  # one context per certificate
    async with tls_server(server_certs.server_credentials()) as serving:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", serving.port, ssl=first, server_hostname="localhost"
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "h2"
        assert ssl_object.getpeercert() is not None  # the server's chain was verified
        writer.transport.abort()  # the server's HTTP/2 SETTINGS would race a TLS close
    clock.advance(SHORT * 0.7)
    assert client_certs.ssl_client_context() is not first  # renewed: a new context


async def test_the_server_ssl_context_follows_rotation_for_new_connections() -> None:
    """What a sidecar's relay listens with: mutual TLS over plain asyncio, the renewed
    certificate presented to new connections, whether the client sends SNI or not."""
    clock = FakeClock()
    ca = CertificateAuthority.create(TD, clock=clock)
    server_certs = CertificateSource(ca, SERVER, lifetime=SHORT, clock=clock)
    client_certs = CertificateSource(ca, CLIENT, lifetime=SHORT, clock=clock)
    first = server_certs.current()
    callers: list[PeerInfo] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        callers.append(peer_from_ssl(writer.get_extra_info("ssl_object")))
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client hangs up (aborts)
        writer.transport.abort()

    server = await asyncio.start_server(
        accept, "127.0.0.1", 0, ssl=server_certs.ssl_server_context()
    )
    port = server.sockets[0].getsockname()[1]

    async def served_serial(server_hostname: str) -> int:
        _, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=client_certs.ssl_client_context(),
            server_hostname=server_hostname,
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "h2"
        der = ssl_object.getpeercert(binary_form=True)
        writer.transport.abort()
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    try:
        # An IP address is never sent as SNI: the callback runs all the same.
        assert await served_serial("127.0.0.1") == first.serial
        clock.advance(SHORT * 0.7)
        renewed = await served_serial("127.0.0.1")
        assert renewed != first.serial
        assert await served_serial("localhost") == renewed
        deadline = asyncio.get_running_loop().time() + 10
        while len(callers) < 3:
            assert asyncio.get_running_loop().time() < deadline, "a handshake never completed"
            await asyncio.sleep(0.01)
        assert {caller.spiffe_id for caller in callers} == {CLIENT.uri}
        assert all(caller.tls and caller.verified for caller in callers)
    finally:
        server.close()
        await server.wait_closed()
