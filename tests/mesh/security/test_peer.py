"""PeerAuthentication: mode precedence, the accept decision, and a STRICT server's refusals."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from mesh.config.resource import Metadata
from mesh.config.security import MtlsMode, PeerAuthentication
from mesh.errors import MeshError
from mesh.security.ca import CertificateAuthority
from mesh.security.guard import Context, GuardInterceptor
from mesh.security.identity import WorkloadIdentity
from mesh.security.peer import (
    PeerInfo,
    check_peer,
    decide,
    listeners_for,
    peer_from_context,
    resolve_mode,
    server_credentials,
)
from mesh.security.rotation import CertificateSource
from mesh.security.workload import Workload
from tests.mesh.security.tls_support import call_who, tls_server

TD = "cluster.local"
APP = Workload("ml", (("app", "inference"), ("version", "v1")))


def pa(
    name: str,
    namespace: str,
    mode: MtlsMode,
    selector: tuple[tuple[str, str], ...] = (),
    ports: tuple[tuple[int, MtlsMode], ...] = (),
) -> PeerAuthentication:
    return PeerAuthentication(Metadata(name, namespace), selector, mode, ports)


MESH_STRICT = pa("mesh", "meshserve", "STRICT")
NS_PERMISSIVE = pa("ns", "ml", "PERMISSIVE")
WL_DISABLE = pa("wl", "ml", "DISABLE", (("app", "inference"),), ((9000, "STRICT"),))
WL_UNSET = pa("wl-unset", "ml", "UNSET", (("app", "inference"),))
OTHER_WL = pa("other", "ml", "DISABLE", (("app", "training"),))


@pytest.mark.parametrize(
    ("policies", "port", "mode", "source"),
    [
        ((), None, "PERMISSIVE", "default"),
        ((MESH_STRICT,), None, "STRICT", "PeerAuthentication/mesh"),
        ((MESH_STRICT, NS_PERMISSIVE), None, "PERMISSIVE", "PeerAuthentication/ns"),
        ((MESH_STRICT, NS_PERMISSIVE, WL_DISABLE), None, "DISABLE", "PeerAuthentication/wl"),
        ((MESH_STRICT, WL_DISABLE), 9000, "STRICT", "PeerAuthentication/wl port 9000"),
        ((MESH_STRICT, WL_DISABLE), 9001, "DISABLE", "PeerAuthentication/wl"),
        ((NS_PERMISSIVE, WL_UNSET), None, "PERMISSIVE", "PeerAuthentication/ns"),
        ((MESH_STRICT, OTHER_WL), None, "STRICT", "PeerAuthentication/mesh"),
        ((pa("elsewhere", "other-ns", "DISABLE"),), None, "PERMISSIVE", "default"),
    ],
)
def test_mode_precedence(
    policies: tuple[PeerAuthentication, ...], port: int | None, mode: str, source: str
) -> None:
    resolved = resolve_mode(policies, APP, port)
    assert (resolved.mode, resolved.source) == (mode, source)


PLAINTEXT = PeerInfo()
TLS_ANON = PeerInfo(tls=True)
MESH_PEER = PeerInfo(tls=True, verified=True, spiffe_id="spiffe://cluster.local/ns/ml/sa/gw")
NO_SPIFFE = PeerInfo(tls=True, verified=True)


@pytest.mark.parametrize(
    ("mode", "peer", "accepted", "reason"),
    [
        ("STRICT", PLAINTEXT, False, "plaintext connections are refused"),
        ("STRICT", TLS_ANON, False, "no certificate of the mesh CA"),
        ("STRICT", NO_SPIFFE, False, "no valid SPIFFE id"),
        ("STRICT", MESH_PEER, True, "mTLS peer spiffe://cluster.local/ns/ml/sa/gw"),
        ("PERMISSIVE", PLAINTEXT, True, "anonymous peer accepted"),
        ("PERMISSIVE", MESH_PEER, True, "mTLS peer"),
        ("DISABLE", PLAINTEXT, True, "DISABLE"),
    ],
)
def test_decide(mode: MtlsMode, peer: PeerInfo, accepted: bool, reason: str) -> None:
    verdict = decide(mode, peer)
    assert verdict.accepted is accepted
    assert reason in verdict.reason


def test_listeners() -> None:
    assert listeners_for("STRICT") == ("mtls",)
    assert listeners_for("PERMISSIVE") == ("mtls", "plaintext")
    assert listeners_for("DISABLE") == ("plaintext",)
    assert MESH_PEER.principal == "cluster.local/ns/ml/sa/gw"


async def _strict_check(method: str, context: Context) -> None:
    check_peer("STRICT", peer_from_context(context))


async def test_strict_server_refuses_plaintext_and_foreign_ca_clients() -> None:
    ca = CertificateAuthority.create(TD)
    rogue_ca = CertificateAuthority.create(TD)  # same trust domain, different root
    server = CertificateSource(ca, WorkloadIdentity(TD, "ml", "inference"))
    client = CertificateSource(ca, WorkloadIdentity(TD, "ml", "gateway"))
    rogue = CertificateSource(rogue_ca, WorkloadIdentity(TD, "ml", "gateway"))
    creds = server_credentials("STRICT", server)
    assert creds is not None
    async with tls_server(creds, [GuardInterceptor(_strict_check)]) as serving:
        target = f"localhost:{serving.port}"
        async with grpc.aio.secure_channel(target, client.channel_credentials()) as ok:
            assert await call_who(ok) == "spiffe://cluster.local/ns/ml/sa/gateway"
        async with grpc.aio.insecure_channel(target) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call_who(plain, wait_for_ready=False)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        # The rogue client trusts our server's CA, so only the server side can refuse it.
        rogue_creds = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem,
            private_key=rogue.current().key_pem,
            certificate_chain=rogue.current().cert_pem,
        )
        async with grpc.aio.secure_channel(target, rogue_creds) as foreign:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call_who(foreign)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        # Server-authenticated TLS without a client certificate: refused as well.
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
        async with grpc.aio.secure_channel(target, no_cert) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call_who(anonymous)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_strict_check_refuses_a_plaintext_call_with_unauthenticated() -> None:
    # Defence in depth: a STRICT check behind a plaintext listener (a misconfiguration)
    # still refuses, naming why.
    async with tls_server(None, [GuardInterceptor(_strict_check)]) as serving:
        async with grpc.aio.insecure_channel(serving.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call_who(plain)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "plaintext connections are refused" in (refused.value.details() or "")


def test_check_peer_raises_a_mesh_error() -> None:
    with pytest.raises(MeshError, match="STRICT"):
        check_peer("STRICT", TLS_ANON)
