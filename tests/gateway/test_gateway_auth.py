"""A real gateway with client authentication in front of its proxy; and `meshserve auth`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.main import main
from gateway.app import Gateway
from gateway.auth import AuthConfig, ClientGuard, hash_key, new_key
from mesh.routing.discovery import StaticDiscovery, StaticInstance
from mesh.server.app import ServerSettings
from mesh.server.testing import serve
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from tests.gateway.backends import FakeWorker
from tests.gateway.harness import REPO


@asynccontextmanager
async def guarded_gateway(guard: ClientGuard) -> AsyncIterator[str]:
    """A gateway with ``guard`` in front of one fake worker ("w0"), once it routes to it;
    yields its address."""
    worker = FakeWorker("w0")
    async with serve(worker.services()) as (backend, _):
        discovery = StaticDiscovery([StaticInstance("inference", "w0", backend.address)])
        gateway = Gateway(discovery, config_dir=REPO / "config", guard=guard)
        serving = await gateway.start(ServerSettings())
        assert gateway.relay is not None
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while not gateway.state.snapshot.endpoints("inference"):
                assert asyncio.get_running_loop().time() < deadline, "no endpoint discovered"
                await asyncio.wait_for(gateway.endpoints_changed.wait(), timeout=10)
            yield serving.address
        finally:
            await serving.drain(grace=0)


async def test_gateway_refuses_unauthenticated_calls_and_routes_authenticated_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["auth", "new-key", "--client", "analytics"]) == 0
    printed = capsys.readouterr().out
    key = re.search(r"(msk_\S+)", printed)
    assert key is not None
    entry = printed.strip().splitlines()[-1]
    assert hash_key(key.group(1)) in entry
    assert main(["auth", "new-key", "--client", "ops", "--scope", "admin"]) == 0
    printed = capsys.readouterr().out
    admin_key = re.search(r"(msk_\S+)", printed)
    assert admin_key is not None
    admin_entry = printed.strip().splitlines()[-1]
    assert admin_entry.endswith("scopes: [admin]}")
    # A burst of 2 at 1 request/s: the third authenticated call in a row is limited.
    (tmp_path / "auth.yaml").write_text(
        f"apiKeys:\n{entry}\n{admin_entry}\nrateLimit: {{requestsPerSecond: 1, burst: 2}}\n"
    )
    guard = ClientGuard(AuthConfig.load(tmp_path / "auth.yaml"))
    async with guarded_gateway(guard) as address, grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="m")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(request, timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", f"Bearer {key.group(1)}"),)
        reply = await stub.ModelInfer(request, metadata=auth, timeout=10)
        assert reply.id == "w0"
        # The gateway's own services are guarded too (the relay hands them over
        # after its check; the server behind it does not check again). Admin
        # needs the admin scope: a data-plane key is known but not allowed.
        admin = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.DumpConfig(admin_pb2.DumpConfigRequest(), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await admin.DumpConfig(admin_pb2.DumpConfigRequest(), metadata=auth, timeout=10)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "lacks the 'admin' scope" in (denied.value.details() or "")
        ops = (("x-api-key", admin_key.group(1)),)
        await admin.DumpConfig(admin_pb2.DumpConfigRequest(), metadata=ops, timeout=10)
        # A refused call spends no token; ops has a bucket of its own.
        await stub.ModelInfer(request, metadata=auth, timeout=10)
        # Two tokens spent (both ModelInfer): the next call waits.
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await stub.ModelInfer(request, metadata=auth, timeout=10)
        assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(limited.value.trailing_metadata() or ())
        assert int(trailers["grpc-retry-pushback-ms"]) > 0


async def test_two_credentials_of_one_kind_on_a_call_are_refused_naming_the_header(
    tmp_path: Path,
) -> None:
    """With two x-api-key headers the last one won: a valid key after an invalid one was
    admitted as its client. Which credential is meant is ambiguous: refused, as the guard
    behind the relay (its own services) refuses it too."""
    good, other = new_key(), new_key()
    (tmp_path / "auth.yaml").write_text(
        f"apiKeys:\n  - {{client: a, sha256: {hash_key(good)}}}\n"
        f"  - {{client: b, sha256: {hash_key(other)}}}\n"
    )
    guard = ClientGuard(AuthConfig.load(tmp_path / "auth.yaml"))
    async with guarded_gateway(guard) as address, grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        request = pb.ModelInferRequest(model_name="m")
        reply = await stub.ModelInfer(request, metadata=(("x-api-key", good),), timeout=10)
        assert reply.id == "w0"
        for name, values in [
            ("x-api-key", ("not a key", good)),
            ("x-api-key", (good, other)),
            ("authorization", (f"Bearer {good}", f"Bearer {other}")),
        ]:
            metadata = tuple((name, v) for v in values)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(request, metadata=metadata, timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details() == (
                f"more than one {name!r} header: send one credential per call"
            )
        # Health is exempt: credentials are not read there at all.
        await health.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
