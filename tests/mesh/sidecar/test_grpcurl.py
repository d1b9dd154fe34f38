"""A sidecar's mesh port with the real grpcurl: what it lists, and a plaintext client told why.

A data worker (its real protos, so reflection can describe them) behind a STRICT sidecar,
in process; grpcurl runs as a subprocess with a mesh certificate from the same CA.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from elasticsearch import AsyncElasticsearch

from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.server.app import ServerSettings, start_server
from mesh.sidecar.app import INBOUND_SERVICE, SidecarSettings
from registry.schema import Indices
from registry.store import Store
from tests.mesh.sidecar.started import TD, started_sidecar
from tests.support.grpcurl import grpcurl_async
from workers.data.service import data_service
from workers.data.storage import DatasetStore

DATA_SERVICE = "meshserve.data.v1.DataService"


@dataclass
class Door:
    #: The sidecar's mesh port, as a client dials it.
    target: str
    #: grpcurl's TLS flags: the mesh CA, and a client certificate it issued.
    tls: tuple[str, ...]


@pytest.fixture
async def door(es: AsyncElasticsearch, indices: Indices, tmp_path: Path) -> AsyncIterator[Door]:
    ca = CertificateAuthority.create(TD)
    client = ca.issue(WorkloadIdentity(TD, "meshserve", "gateway"))
    client.save(tmp_path)
    async with AsyncExitStack() as stack:
        worker = await start_server(
            ServerSettings(), [data_service(DatasetStore(str(tmp_path / "data")))]
        )
        stack.push_async_callback(worker.drain, 0)
        settings = SidecarSettings(
            service="data", app_address=worker.address, mtls="STRICT", drain_delay=0.0
        )
        sidecar = await started_sidecar(stack, settings, Store(es, indices), ca)
        assert sidecar.serving is not None
        tls = (
            f"-cacert={tmp_path / 'ca.pem'}",
            f"-cert={tmp_path / 'cert.pem'}",
            f"-key={tmp_path / 'key.pem'}",
        )
        yield Door(f"localhost:{sidecar.serving.port}", tls)


async def test_grpcurl_with_a_mesh_certificate_lists_and_describes_the_fronted_services(
    door: Door,
) -> None:
    listed = await grpcurl_async(*door.tls, door.target, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert DATA_SERVICE in services
    assert INBOUND_SERVICE not in services
    described = await grpcurl_async(*door.tls, door.target, "describe", DATA_SERVICE)
    assert described.returncode == 0, described.stderr
    assert "rpc StreamBatches" in described.stdout and "rpc ListDatasets" in described.stdout
    # A unary call, then a server-streaming one, through the sidecar to the worker.
    builtin = {
        "name": "blobs",
        "split": {"validation_fraction": 0.25, "seed": 1},
        "blobs": {"num_examples": 40, "num_classes": 2, "num_features": 3},
    }
    created = await grpcurl_async(
        *door.tls, "-d", json.dumps(builtin), door.target, f"{DATA_SERVICE}/CreateBuiltinDataset"
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["name"] == "blobs"
    request = {"dataset": "blobs", "split": "SPLIT_TRAIN", "batch_size": 10}
    streamed = await grpcurl_async(
        *door.tls, "-d", json.dumps(request), door.target, f"{DATA_SERVICE}/StreamBatches"
    )
    # 30 training examples (a quarter of 40 is validation) in batches of 10.
    batches = streamed.messages()
    assert [(b.get("index", "0"), b["size"]) for b in batches] == [("0", 10), ("1", 10), ("2", 10)]


async def test_grpcurl_in_plaintext_is_refused_at_once_with_a_message_that_says_mtls(
    door: Door,
) -> None:
    # Before, grpcurl redialled a dropped connection until its connect timeout and said
    # only "context deadline exceeded"; a timeout longer than the test's own shows that the
    # answer is the refusal, not the deadline.
    for command in (("list",), (f"{DATA_SERVICE}/ListDatasets",)):
        refused = await grpcurl_async("-plaintext", "-connect-timeout=120", door.target, *command)
        assert refused.returncode != 0
        assert "Unauthenticated" in refused.stderr, refused.stderr
        assert "requires mutual TLS (mTLS)" in refused.stderr, refused.stderr
        assert "deadline" not in refused.stderr


async def test_a_client_that_is_not_http2_gets_the_reason_as_a_line_and_a_close(
    door: Door,
) -> None:
    host, port = door.target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)  # to EOF: the door closed it
    finally:
        writer.close()
    assert b"requires mutual TLS (mTLS)" in answer
