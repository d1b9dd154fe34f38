"""The sidecar in process: mTLS and policies at the door, health in the registry, drain, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.config.loader import parse_yaml
from mesh.config.security import AuthorizationPolicy, PeerAuthentication
from mesh.config.snapshot import config_from_yaml
from mesh.errors import InvalidArgument
from mesh.header_limits import HOP_ALLOWANCE, INBOUND_HEADER_LIST, MAX_HEADER_LIST
from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.security.rotation import CertificateSource
from mesh.server.app import ServerSettings, Serving, start_server
from mesh.sidecar.app import Sidecar, SidecarPolicies, SidecarSettings
from registry.directory import read_live
from registry.instances import Instance, Status
from registry.schema import Indices
from registry.store import Store
from tests.mesh.security.jwt_support import Issuer
from tests.mesh.sidecar.worker import ECHO, SLOW, Worker

TD = "cluster.local"


@dataclass
class Rig:
    worker: Worker
    worker_serving: Serving
    sidecar: Sidecar
    ca: CertificateAuthority
    es: AsyncElasticsearch
    indices: Indices

    @property
    def target(self) -> str:
        assert self.sidecar.serving is not None
        return f"localhost:{self.sidecar.serving.port}"

    def client(self, service: str, namespace: str = "meshserve") -> grpc.aio.Channel:
        certs = CertificateSource(self.ca, WorkloadIdentity(TD, namespace, service))
        return grpc.aio.secure_channel(self.target, certs.channel_credentials())

    async def instance(self) -> Instance | None:
        snapshot = await read_live(self.es, self.indices, datetime.now(UTC), service="inference")
        return next(iter(snapshot.instances.values()), None)

    async def until(self, predicate: Callable[[], Awaitable[bool]], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while not await predicate():
            assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
            await asyncio.sleep(0.05)


POLICY_TEXT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-training-on-inference}
spec:
  selector: {matchLabels: {app: inference}}
  action: DENY
  rules: [{from: [{source: {namespaces: [ml]}}]}]
"""
DENY_TRAINING = tuple(
    d.resource
    for d in parse_yaml(POLICY_TEXT, "policy.yaml")
    if isinstance(d.resource, AuthorizationPolicy)
)


@asynccontextmanager
async def rigged(
    es: AsyncElasticsearch,
    indices: Indices,
    settings: Callable[[str], SidecarSettings],
    *,
    policies: SidecarPolicies | None = None,
    worker_at: ServerSettings | None = None,
) -> AsyncIterator[Rig]:
    """A worker (served at ``worker_at``) behind a started inference sidecar, which
    ``settings(worker address)`` configures, with a certificate from a fresh CA; both drained
    on the way out, the worker's held calls released first so that drain does not wait."""
    worker = Worker()
    worker_serving = await start_server(worker_at or ServerSettings(), [worker.service()])
    ca = CertificateAuthority.create(TD)
    sidecar = Sidecar(
        settings(worker_serving.address),
        Store(es, indices),
        certificates=CertificateSource(ca, WorkloadIdentity(TD, "meshserve", "inference")),
        policies=policies,
    )
    await sidecar.start()
    try:
        yield Rig(worker, worker_serving, sidecar, ca, es, indices)
    finally:
        worker.release.set()
        await sidecar.drain()
        await worker_serving.drain(grace=0)


@pytest.fixture
async def rig(es: AsyncElasticsearch, indices: Indices) -> AsyncIterator[Rig]:
    def settings(address: str) -> SidecarSettings:
        return SidecarSettings(
            service="inference",
            app_address=address,
            mtls="STRICT",
            max_concurrency=2,
            drain_delay=0.0,
            grace_seconds=10,
        )

    policies = SidecarPolicies(authorization_policies=DENY_TRAINING)
    async with rigged(es, indices, settings, policies=policies) as r:
        yield r


async def call(channel: grpc.aio.Channel, path: str = ECHO, payload: bytes = b"hi") -> bytes:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    return await method(payload, timeout=10)


async def test_mtls_peers_reach_the_worker_with_their_identity(rig: Rig) -> None:
    async with rig.client("gateway") as channel:
        assert await call(channel) == b"spiffe://cluster.local/ns/meshserve/sa/gateway|hi"


async def test_a_callers_own_peer_header_never_reaches_the_worker(rig: Rig) -> None:
    forged = (("x-meshserve-peer", "spiffe://cluster.local/ns/meshserve/sa/admin"),)
    async with rig.client("gateway") as channel:
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
        reply = await method(b"hi", timeout=10, metadata=forged)
    assert reply == b"spiffe://cluster.local/ns/meshserve/sa/gateway|hi"


async def test_health_through_the_sidecar_port_mirrors_the_worker(rig: Rig) -> None:
    """The relay hands health to the sidecar's own gRPC server, which follows the worker."""
    async with rig.client("gateway") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status_is(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> bool:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            return bool(reply.status == status)

        await rig.until(lambda: status_is(health_pb2.HealthCheckResponse.SERVING), "SERVING")
        await rig.worker_serving.set_serving(False)
        await rig.until(
            lambda: status_is(health_pb2.HealthCheckResponse.NOT_SERVING), "NOT_SERVING mirrored"
        )
        await rig.worker_serving.set_serving(True)
    # Health passes the same door as every call: a peer the policies deny is refused.
    async with rig.client("training", namespace="ml") as denied_channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await health_pb2_grpc.HealthStub(denied_channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_strict_sidecar_refuses_plaintext_and_foreign_certificates(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(plain)
        # At once, and saying why (mesh.proxy.tls_door), not a dropped connection.
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "requires mutual TLS" in (refused.value.details() or "")
    rogue = CertificateSource(
        CertificateAuthority.create(TD), WorkloadIdentity(TD, "meshserve", "gateway")
    ).current()
    creds = grpc.ssl_channel_credentials(rig.ca.cert_pem, rogue.key_pem, rogue.cert_pem)
    async with grpc.aio.secure_channel(rig.target, creds) as foreign:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(foreign)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert rig.worker.started == 0


async def test_deny_policy_at_the_sidecar(rig: Rig) -> None:
    async with rig.client("training", namespace="ml") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call(channel)
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "AuthorizationPolicy/no-training-on-inference" in (denied.value.details() or "")


async def test_worker_health_is_mirrored_into_the_registry(rig: Rig) -> None:
    async def status_is(status: Status) -> bool:
        found = await rig.instance()
        return found is not None and found.status is status

    await rig.until(lambda: status_is(Status.SERVING), "registered SERVING")
    found = await rig.instance()
    assert found is not None and found.address == rig.target
    await rig.worker_serving.set_serving(False)
    await rig.until(lambda: status_is(Status.NOT_SERVING), "NOT_SERVING mirrored")
    await rig.worker_serving.set_serving(True)
    await rig.until(lambda: status_is(Status.SERVING), "SERVING mirrored")


async def test_concurrency_limit_refuses_the_call_over_it(rig: Rig) -> None:
    async with rig.client("gateway") as channel:
        slow = [asyncio.create_task(call(channel, SLOW, b"%d" % i)) for i in range(2)]

        async def both_started() -> bool:
            return rig.worker.started == 2

        await rig.until(both_started, "two slow calls in the worker")
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await call(channel)
        assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrency limit of 2" in (limited.value.details() or "")
        rig.worker.release.set()
        assert sorted(await asyncio.gather(*slow)) == [b"done:0", b"done:1"]


async def test_drain_finishes_in_flight_calls_and_deregisters(rig: Rig) -> None:
    async def serving() -> bool:
        found = await rig.instance()
        return found is not None and found.status is Status.SERVING

    await rig.until(serving, "registered SERVING")
    async with rig.client("gateway") as channel:
        in_flight = asyncio.create_task(call(channel, SLOW, b"x"))

        async def started() -> bool:
            return rig.worker.started == 1

        await rig.until(started, "the slow call reached the worker")
        # Long enough for DRAINING to become searchable (index refresh: 1 s).
        rig.sidecar.settings = replace(rig.sidecar.settings, drain_delay=2.0)
        drain = asyncio.create_task(rig.sidecar.drain())

        async def draining() -> bool:
            found = await rig.instance()
            return found is not None and found.status is Status.DRAINING

        await rig.until(draining, "DRAINING published")
        # Still serving while DRAINING propagates.
        assert (await call(channel)).endswith(b"|hi")

        async def gone() -> bool:
            return await rig.instance() is None

        await rig.until(gone, "deregistered")
        rig.worker.release.set()
        assert await in_flight == b"done:x"
        await drain


ALLOW_MESH_ONLY = tuple(
    d.resource
    for d in parse_yaml(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-only-slow}
spec:
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/meshtest.Worker/Echo"]}}]
  - from: [{source: {principals: ["*"]}}]
"""
        + """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: permissive}
spec: {mtls: {mode: PERMISSIVE}}
""",
        "policy.yaml",
    )
)


async def test_permissive_serves_mesh_peers_on_mtls_and_others_on_the_plaintext_port(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    policies = SidecarPolicies(
        peer_authentications=[r for r in ALLOW_MESH_ONLY if isinstance(r, PeerAuthentication)],
        authorization_policies=[r for r in ALLOW_MESH_ONLY if isinstance(r, AuthorizationPolicy)],
    )

    def settings(address: str) -> SidecarSettings:
        return SidecarSettings(
            service="inference", app_address=address, plaintext_port=0, drain_delay=0
        )

    async with rigged(es, indices, settings, policies=policies) as r:
        worker, sidecar, ca = r.worker, r.sidecar, r.ca
        assert sidecar.mode == "PERMISSIVE"
        assert sidecar.serving is not None and sidecar.plaintext_address is not None
        mesh = CertificateSource(ca, WorkloadIdentity(TD, "meshserve", "gateway"))
        async with grpc.aio.secure_channel(
            f"localhost:{sidecar.serving.port}", mesh.channel_credentials()
        ) as secure:
            assert await call(secure) == b"spiffe://cluster.local/ns/meshserve/sa/gateway|hi"
            worker.release.set()
            assert await call(secure, SLOW) == b"done:hi"
        async with grpc.aio.insecure_channel(sidecar.plaintext_address) as plain:
            assert await call(plain) == b"anonymous|hi"
            # Rule 1 needs a principal, which a plaintext caller never has.
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call(plain, SLOW)
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # Plaintext on the mTLS port is still refused.
        async with grpc.aio.insecure_channel(sidecar.serving.address) as wrong:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(wrong)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_plaintext_port_contradicts_strict(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    ca = CertificateAuthority.create(TD)
    sidecar = Sidecar(
        SidecarSettings(
            service="inference", app_address="127.0.0.1:1", mtls="STRICT", plaintext_port=0
        ),
        Store(es, indices),
        certificates=CertificateSource(ca, WorkloadIdentity(TD, "meshserve", "inference")),
    )
    with pytest.raises(InvalidArgument, match="plaintext port is PERMISSIVE's second listener"):
        await sidecar.start()


async def test_policies_reload_from_the_config_folder(
    tmp_path: Path, es: AsyncElasticsearch, indices: Indices
) -> None:
    def settings(address: str) -> SidecarSettings:
        return SidecarSettings(
            service="inference",
            app_address=address,
            mtls="STRICT",
            drain_delay=0,
            config_dir=tmp_path,
            reload_interval=0.05,
        )

    async with rigged(es, indices, settings) as r:
        sidecar = r.sidecar
        assert sidecar.serving is not None
        serving = sidecar.serving
        client = CertificateSource(r.ca, WorkloadIdentity(TD, "ml", "training"))
        async with grpc.aio.secure_channel(
            f"localhost:{serving.port}",
            client.channel_credentials(),
        ) as channel:
            assert (await call(channel)).endswith(b"|hi")
            (tmp_path / "deny.yaml").write_text(POLICY_TEXT)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                try:
                    await call(channel)
                except grpc.aio.AioRpcError as error:
                    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
                    break
                assert loop.time() < deadline, "the DENY policy was never loaded"
                await asyncio.sleep(0.05)
            # A broken file is rejected; the last good policies stay in force.
            (tmp_path / "deny.yaml").write_text("kind: AuthorizationPolicy\n")
            deadline = loop.time() + 10
            while sidecar.last_rejection is None:
                assert loop.time() < deadline, "the broken file was never read"
                await asyncio.sleep(0.05)
            assert "deny.yaml" in sidecar.last_rejection
            with pytest.raises(grpc.aio.AioRpcError) as still:
                await call(channel)
            assert still.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_worker_on_a_unix_socket_is_reached_through_the_relay(
    tmp_path: Path, es: AsyncElasticsearch, indices: Indices
) -> None:
    def settings(address: str) -> SidecarSettings:
        return SidecarSettings(
            service="inference", app_address=address, mtls="STRICT", drain_delay=0
        )

    worker_at = ServerSettings(host=f"unix:{tmp_path / 'worker.sock'}")
    async with rigged(es, indices, settings, worker_at=worker_at) as r:
        assert r.sidecar.serving is not None
        serving = r.sidecar.serving
        client = CertificateSource(r.ca, WorkloadIdentity(TD, "meshserve", "gateway"))
        assert r.worker_serving.address.startswith("unix:")
        async with grpc.aio.secure_channel(
            f"localhost:{serving.port}", client.channel_credentials()
        ) as channel:
            assert await call(channel) == b"spiffe://cluster.local/ns/meshserve/sa/gateway|hi"


async def test_a_strict_sidecars_health_port_answers_health_only_in_plaintext(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    """The kubelet's grpc probe cannot do mTLS: the health port tells it the sidecar's
    health (the worker's, mirrored) and serves no other call."""

    def settings(address: str) -> SidecarSettings:
        return SidecarSettings(
            service="inference", app_address=address, mtls="STRICT", health_port=0, drain_delay=0
        )

    async with rigged(es, indices, settings) as r:
        assert r.sidecar.health_address is not None
        async with grpc.aio.insecure_channel(r.sidecar.health_address) as plain:
            health = health_pb2_grpc.HealthStub(plain)

            async def status_is(
                status: health_pb2.HealthCheckResponse.ServingStatus.ValueType,
            ) -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                return bool(reply.status == status)

            await r.until(lambda: status_is(health_pb2.HealthCheckResponse.SERVING), "SERVING")
            await r.worker_serving.set_serving(False)
            await r.until(
                lambda: status_is(health_pb2.HealthCheckResponse.NOT_SERVING), "NOT_SERVING"
            )
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await call(plain)
            assert other.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # Drained: the health port is closed too.
    async with grpc.aio.insecure_channel(r.sidecar.health_address) as gone:
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await health_pb2_grpc.HealthStub(gone).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert closed.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


def end_user_policies(rsa: Issuer, ec: Issuer) -> SidecarPolicies:
    text = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: end-users}}
spec:
  selector: {{matchLabels: {{app: inference}}}}
  jwtRules:
    - {{issuer: {rsa.iss}, jwks: '{rsa.jwks()}'}}
    - {{issuer: {ec.iss}, jwks: '{ec.jwks()}', audiences: [inference]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: signed-in-ml}}
spec:
  selector: {{matchLabels: {{app: inference}}}}
  rules:
    - from: [{{source: {{requestPrincipals: ["*"]}}}}]
      when: [{{key: "request.auth.claims[groups]", values: [ml]}}]
"""
    config = config_from_yaml(text, source="end-users.yaml")
    return SidecarPolicies(
        authorization_policies=config.authorization_policies,
        request_authentications=config.request_authentications,
    )


async def test_request_authentication_at_the_sidecar_inbound(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    rsa, ec = Issuer.rsa("https://login.example.com"), Issuer.ec("https://ec.example.com")

    def settings(address: str) -> SidecarSettings:
        return SidecarSettings(
            service="inference", app_address=address, mtls="STRICT", drain_delay=0
        )

    async def code(channel: grpc.aio.Channel, token: str | None) -> grpc.StatusCode:
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
        metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        try:
            await method(b"hi", timeout=10, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    policies = end_user_policies(rsa, ec)
    async with rigged(es, indices, settings, policies=policies) as r, r.client("gateway") as ch:
        assert await code(ch, rsa.token(groups=["ml"])) is grpc.StatusCode.OK
        assert await code(ch, ec.token(groups=["ml"], aud="inference")) is grpc.StatusCode.OK
        # Valid, but the claim the policy wants is missing: authorization refuses.
        assert await code(ch, rsa.token(groups=["ops"])) is grpc.StatusCode.PERMISSION_DENIED
        # No token: accepted by RequestAuthentication, no principal, so the ALLOW fails.
        assert await code(ch, None) is grpc.StatusCode.PERMISSION_DENIED
        # Invalid tokens: refused before authorization.
        wrong_aud = ec.token(groups=["ml"], aud="training")
        assert await code(ch, wrong_aud) is grpc.StatusCode.UNAUTHENTICATED
        forged = Issuer.rsa(rsa.iss).token(groups=["ml"])
        assert await code(ch, forged) is grpc.StatusCode.UNAUTHENTICATED


async def test_the_inbound_accepts_an_edge_sized_header_list_with_what_a_hop_added(
    rig: Rig,
) -> None:
    """The gateway accepts MAX_HEADER_LIST from a client and adds its own headers: the
    sidecar behind it refused that forward RESOURCE_EXHAUSTED at the same limit."""
    size = MAX_HEADER_LIST + HOP_ALLOWANCE // 2
    async with rig.client("gateway") as channel:
        peer = b"spiffe://cluster.local/ns/meshserve/sa/gateway|"
        assert await call(channel) == peer + b"hi"  # grpc-core applies limits after SETTINGS
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
        reply = await method(b"big", metadata=(("x-big", "v" * size),), timeout=10)
        assert reply == peer + b"big"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await method(b"big", metadata=(("x-big", "v" * INBOUND_HEADER_LIST),), timeout=10)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


DENY_ADMIN_HEADER = tuple(
    d.resource
    for d in parse_yaml(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admins}
spec:
  selector: {matchLabels: {app: inference}}
  action: DENY
  rules: [{when: [{key: "request.headers[x-user]", values: ["admin*"]}]}]
""",
        "policy.yaml",
    )
    if isinstance(d.resource, AuthorizationPolicy)
)


async def test_a_repeated_header_cannot_dodge_a_deny_on_it(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    """``x-user: admin`` then ``x-user: bob``: the worker reads both values, so the policy
    reads both (joined by ",", as Envoy matches them); it read only the last and let the
    call through to the worker."""

    def settings(address: str) -> SidecarSettings:
        return SidecarSettings(
            service="inference", app_address=address, mtls="STRICT", drain_delay=0.0
        )

    policies = SidecarPolicies(authorization_policies=DENY_ADMIN_HEADER)
    async with rigged(es, indices, settings, policies=policies) as rig:
        async with rig.client("gateway") as channel:
            method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
            assert await method(b"hi", timeout=10, metadata=(("x-user", "bob"),))
            for sent in (("admin", "bob"), ("bob", "admin")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await method(b"hi", timeout=10, metadata=[("x-user", v) for v in sent])
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, sent
