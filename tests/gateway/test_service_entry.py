"""ServiceEntry and DestinationRule ``tls`` through a real gateway: a worker outside the
registry is reached by its entry, behind the same rules, retries and TLS settings."""

from __future__ import annotations

import socket
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest

from gateway.app import Gateway
from mesh.routing.discovery import DiscoverySource, StaticDiscovery
from mesh.security.ca import CertificateAuthority, IssuedCertificate
from mesh.security.identity import WorkloadIdentity
from mesh.security.rotation import CertificateSource
from mesh.server.app import ServerSettings, start_server
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.connect import StoreSettings
from registry.discovery import RegistryDiscovery
from registry.embedded import EmbeddedStore
from registry.store import open_store
from tests.gateway.backends import FakeWorker
from workers.inference import testing
from workers.inference.server import WorkerSettings, run_worker

INT64 = 9  # model_config.proto TYPE_INT64

ROUTE_TO_ENTRY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - route: [{destination: {host: models.example.com}}]
      retries: %(retries)s
"""


def entry(*addresses: str, location: str = "MESH_EXTERNAL", resolution: str = "STATIC") -> str:
    endpoints = "\n".join(
        f"    - {{address: {a.rsplit(':', 1)[0]}, ports: {{grpc: {a.rsplit(':', 1)[1]}}}}}"
        for a in addresses
    )
    return (
        textwrap.dedent(
            f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: external-models}}
        spec:
          hosts: [models.example.com]
          location: {location}
          ports: [{{number: 8001, name: grpc, protocol: GRPC}}]
          resolution: {resolution}
          endpoints:
        """
        )
        + endpoints
        + "\n"
    )


def tls_rule(tls: str, lb: str = "ROUND_ROBIN") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: external-models}\nspec:\n  host: models.example.com\n"
        f"  trafficPolicy: {{loadBalancer: {{simple: {lb}}}{', tls: ' + tls if tls else ''}}}\n"
    )


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedStore(tmp_path_factory.mktemp("es-store"), advertise=False) as store:
        yield store.url


@asynccontextmanager
async def gateway(
    config: Path,
    discovery: DiscoverySource | None = None,
    certs: CertificateSource | None = None,
) -> AsyncIterator[tuple[Gateway, pb_grpc.GRPCInferenceServiceAsyncStub]]:
    gw = Gateway(
        discovery or StaticDiscovery(),
        config_dir=config,
        reload_interval=0.05,
        tls_context=certs.ssl_client_context if certs else None,
    )
    serving = await gw.start(ServerSettings())
    channel = grpc.aio.insecure_channel(serving.address)
    try:
        yield gw, pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await channel.close()
        await serving.drain(grace=0)


def write_config(folder: Path, *documents: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "routing.yaml").write_text("---\n".join(documents))
    return folder


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def intops(ids: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="intops")
    request.inputs.add(name="ids", datatype="INT64", shape=[1, len(ids)])
    request.raw_input_contents.append(np.asarray(ids, dtype="<i8").tobytes())
    return request


async def test_a_worker_outside_the_registry_is_routed_by_its_service_entry(
    tmp_path: Path, store_url: str
) -> None:
    """A real inference worker that never registers: the gateway follows the (empty)
    store, and the ServiceEntry's endpoints carry the calls, with the rule's retries."""
    repo = tmp_path / "repo"
    testing.publish(
        str(repo),
        testing.model_config(
            "intops", [("ids", INT64, [4])], [("total", INT64, [1]), ("doubled", INT64, [4])]
        ),
        testing.IntOps(),
    )
    dead = f"127.0.0.1:{closed_port()}"
    settings = StoreSettings(url=store_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    async with (
        run_worker(WorkerSettings(str(repo), device="cpu", poll_interval_s=0)) as worker,
        open_store(settings) as store,
    ):
        live = worker.serving.address
        for retries, failures in (("{attempts: 2, retryOn: connect-failure}", 0), ("{}", 2)):
            config = write_config(
                tmp_path / f"config-{failures}",
                entry(live, dead),
                ROUTE_TO_ENTRY % {"retries": retries},
                tls_rule(""),
            )
            async with gateway(config, RegistryDiscovery(store.watcher())) as (gw, stub):
                assert gw.state.snapshot.endpoints("models.example.com") == ()
                failed = 0
                for _ in range(4):  # round robin: two calls start on the dead endpoint
                    try:
                        reply = await stub.ModelInfer(intops([1, 2, 3, 4]), timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                        failed += 1
                        continue
                    total = np.frombuffer(reply.raw_output_contents[0], dtype="<i8")
                    assert reply.model_name == "intops" and total.tolist() == [10]
                assert failed == failures, retries


def issue(ca: CertificateAuthority, folder: Path, service: str) -> IssuedCertificate:
    cert = ca.issue(
        WorkloadIdentity("cluster.local", "meshserve", service),
        dns_names=("localhost", "models.example.com"),
    )
    cert.save(folder)
    return cert


@asynccontextmanager
async def tls_worker(
    cert: IssuedCertificate, *, client_auth: bool
) -> AsyncIterator[tuple[FakeWorker, int]]:
    worker = FakeWorker("external")
    credentials = grpc.ssl_server_credentials(
        [(cert.key_pem, cert.cert_pem)],
        root_certificates=cert.ca_pem if client_auth else None,
        require_client_auth=client_auth,
    )
    serving = await start_server(ServerSettings(), worker.services(), credentials=credentials)
    try:
        yield worker, int(serving.address.rsplit(":", 1)[1])
    finally:
        await serving.drain(grace=0)


async def outcome(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> str:
    try:
        reply = await stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return str(reply.id)


async def test_tls_modes_secure_the_upstream_connection(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("cluster.local")
    server = issue(ca, tmp_path / "server", "external")
    issue(ca, tmp_path / "client", "gateway")
    ca_file, client = tmp_path / "server" / "ca.pem", tmp_path / "client"
    simple = f"{{mode: SIMPLE, caCertificates: {ca_file}, sni: models.example.com}}"
    mutual = (
        f"{{mode: MUTUAL, caCertificates: {ca_file}, clientCertificate: {client / 'cert.pem'}, "
        f"privateKey: {client / 'key.pem'}}}"
    )
    cases = [
        # (server asks for a client certificate, tls setting, what the call gets)
        (False, "", "UNAVAILABLE"),  # MESH_EXTERNAL's default: plaintext to a TLS server
        (False, "{mode: DISABLE}", "UNAVAILABLE"),
        (False, simple, "external"),
        (False, "{mode: SIMPLE, sni: models.example.com}", "UNAVAILABLE"),  # system trust
        (
            False,
            f"{{mode: SIMPLE, caCertificates: {ca_file}, sni: other.example.com}}",
            "UNAVAILABLE",
        ),
        (False, "{mode: SIMPLE, insecureSkipVerify: true}", "external"),
        (True, simple, "UNAVAILABLE"),  # no client certificate
        (True, mutual, "external"),
    ]
    for i, (client_auth, tls, expected) in enumerate(cases):
        async with tls_worker(server, client_auth=client_auth) as (_, port):
            config = write_config(
                tmp_path / f"config-{i}",
                entry(f"127.0.0.1:{port}"),
                ROUTE_TO_ENTRY % {"retries": "{}"},
                tls_rule(tls),
            )
            async with gateway(config) as (_, stub):
                assert await outcome(stub) == expected, tls


async def test_istio_mutual_uses_the_mesh_certificate(tmp_path: Path) -> None:
    """ISTIO_MUTUAL is the relay's own mesh identity: the default for MESH_INTERNAL
    entries (a sidecar answers), opt-in for MESH_EXTERNAL ones."""
    ca = CertificateAuthority.create("cluster.local")
    server = issue(ca, tmp_path / "server", "external")
    certs = CertificateSource(ca, WorkloadIdentity("cluster.local", "meshserve", "gateway"))
    cases = [
        ("MESH_INTERNAL", "", "external"),
        ("MESH_EXTERNAL", "", "UNAVAILABLE"),
        ("MESH_EXTERNAL", "{mode: ISTIO_MUTUAL}", "external"),
        ("MESH_INTERNAL", "{mode: DISABLE}", "UNAVAILABLE"),
    ]
    async with tls_worker(server, client_auth=True) as (_, port):
        for i, (location, tls, expected) in enumerate(cases):
            config = write_config(
                tmp_path / f"config-{i}",
                # DNS: the relay resolves the endpoint's name when it connects.
                entry(f"localhost:{port}", location=location, resolution="DNS"),
                ROUTE_TO_ENTRY % {"retries": "{}"},
                tls_rule(tls),
            )
            async with gateway(config, certs=certs) as (_, stub):
                assert await outcome(stub) == expected, (location, tls)
