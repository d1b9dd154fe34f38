"""The TCP mode: a worker on a loopback port serves only calls carrying its sidecar's secret."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.server.app import ServerSettings, Serving, start_server
from mesh.server.listen import add_listen_arguments, server_settings
from mesh.server.sidecar_secret import HEADER, MIN_LENGTH, new_secret, read_secret, write_secret
from mesh.sidecar.app import Sidecar, SidecarSettings
from registry.directory import read_live
from registry.instances import Status
from registry.schema import Indices
from registry.store import Store
from tests.mesh.sidecar.test_sidecar import call
from tests.mesh.sidecar.worker import ECHO, SLOW, Worker


@dataclass
class Unit:
    worker: Worker
    worker_serving: Serving
    sidecar: Sidecar
    secret: str

    @property
    def sidecar_target(self) -> str:
        assert self.sidecar.serving is not None
        return self.sidecar.serving.address


def _sidecar(address: str, store: Store, secret: str | None) -> Sidecar:
    settings = SidecarSettings(
        service="data", app_address=address, mtls="DISABLE", drain_delay=0.0, app_secret=secret
    )
    return Sidecar(settings, store)


@pytest.fixture
async def unit(es: AsyncElasticsearch, indices: Indices) -> AsyncIterator[Unit]:
    secret = new_secret()
    worker = Worker()
    worker_serving = await start_server(
        ServerSettings(host="127.0.0.1", port=0, sidecar_secret=secret), [worker.service()]
    )
    sidecar = _sidecar(worker_serving.address, Store(es, indices), secret)
    await sidecar.start()
    try:
        yield Unit(worker, worker_serving, sidecar, secret)
    finally:
        worker.release.set()
        await sidecar.drain()
        await worker_serving.drain(grace=0)


async def _refused(
    channel: grpc.aio.Channel, path: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await method(b"hi", metadata=metadata, timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "through the sidecar" in (refused.value.details() or "")


async def test_a_direct_call_without_the_secret_is_refused_before_any_handler(unit: Unit) -> None:
    async with grpc.aio.insecure_channel(unit.worker_serving.address) as direct:
        await _refused(direct, SLOW, ())
        await _refused(direct, SLOW, ((HEADER, "x" * len(unit.secret)),))
        with pytest.raises(grpc.aio.AioRpcError) as health:
            await health_pb2_grpc.HealthStub(direct).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert health.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # The right secret is all it takes (what the sidecar sends).
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = direct.unary_unary(ECHO)
        assert await echo(b"hi", metadata=((HEADER, unit.secret),), timeout=10) == b"anonymous|hi"
    # The slow handler never ran: refused calls never reached it.
    assert unit.worker.started == 0


async def test_the_same_call_through_the_sidecar_works_and_health_is_mirrored(
    unit: Unit, es: AsyncElasticsearch, indices: Indices
) -> None:
    async with grpc.aio.insecure_channel(unit.sidecar_target) as channel:
        assert await call(channel) == b"anonymous|hi"
    # The sidecar's own health watch carries the secret too: the instance turns SERVING.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        live = await read_live(es, indices, datetime.now(UTC), service="data")
        if any(i.status is Status.SERVING for i in live.instances.values()):
            break
        assert asyncio.get_running_loop().time() < deadline, "never SERVING in the registry"
        await asyncio.sleep(0.05)


async def test_a_callers_copy_of_the_header_is_not_forwarded(
    unit: Unit, es: AsyncElasticsearch, indices: Indices
) -> None:
    # A sidecar without the secret: the caller's header (right value even) is dropped.
    other = _sidecar(unit.worker_serving.address, Store(es, indices), None)
    serving = await other.start()
    try:
        async with grpc.aio.insecure_channel(serving.address) as channel:
            await _refused(channel, ECHO, ((HEADER, unit.secret),))
    finally:
        await other.drain()


def test_secret_files(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    secret = write_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_secret(path) == secret and len(secret) >= MIN_LENGTH
    # A rerun replaces it (a pod's init container runs again after a restart).
    again = write_secret(path)
    assert again != secret and read_secret(path) == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_secret(short)


def test_listen_flags(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_listen_arguments(parser, default_port=None)
    unix = server_settings(parser.parse_args(["--listen", "unix:/run/w.sock"]), grace_seconds=1)
    assert unix.unix and unix.address == "unix:/run/w.sock" and unix.grace_seconds == 1
    assert unix.sidecar_secret is None
    path = tmp_path / "secret"
    secret = write_secret(path)
    tcp = server_settings(parser.parse_args(["--port", "9000", "--sidecar-secret-file", str(path)]))
    assert tcp.address == "127.0.0.1:9000" and tcp.sidecar_secret == secret
    assert secret not in repr(tcp)
    with pytest.raises(ValueError, match="--port"):
        server_settings(parser.parse_args([]))
    with pytest.raises(ValueError, match="unix:PATH"):
        server_settings(parser.parse_args(["--listen", "127.0.0.1:9000"]))
