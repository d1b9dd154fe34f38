"""Processes: gateway → sidecars (mTLS, STRICT) → workers; SIGTERM a sidecar under load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from elasticsearch import AsyncElasticsearch

from gateway.app import Gateway
from gateway.registry_discovery import RegistryDiscovery
from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.security.rotation import CertificateSource
from mesh.server.app import ServerSettings
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.schema import Indices
from registry.store import Store

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class Processes:
    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, *args: str, expect: str) -> str:
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.running[name] = process
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(expect), f"{name} did not start: {line!r}"
        return line

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.kill()
        for process in self.running.values():
            process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture
def processes() -> Iterator[Processes]:
    p = Processes()
    try:
        yield p
    finally:
        p.stop_all()


@pytest.mark.e2e
async def test_sigterm_of_a_sidecar_under_load_loses_no_request(
    tmp_path: Path,
    processes: Processes,
    es: AsyncElasticsearch,
    indices: Indices,
    store_url: str,
) -> None:
    ca = CertificateAuthority.create("cluster.local")
    ca.save(tmp_path / "certs")
    for name in ("w1", "w2"):
        port = processes.start(
            name, "tests.mesh.sidecar.worker_proc", name, expect="listening on "
        ).split()[-1]
        processes.start(
            f"sidecar-{name}",
            "mesh.cli.main",
            "sidecar",
            "--service=inference",
            f"--instance-id=inference-{name}",
            f"--app=127.0.0.1:{port}",
            "--mtls=STRICT",
            f"--certs={tmp_path / 'certs'}",
            "--drain-delay=3",
            f"--es={store_url}",
            f"--prefix={indices.prefix}",
            expect="sidecar listening on ",
        )
    gateway_certs = CertificateSource(ca, WorkloadIdentity("cluster.local", "meshserve", "gateway"))
    gateway = Gateway(
        RegistryDiscovery(Store(es, indices).watcher()),
        config_dir=REPO / "config",
        channel_credentials=gateway_certs.channel_credentials,
    )
    serving = await gateway.start(ServerSettings())
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + 30
        while len([e for e in gateway.state.snapshot.endpoints("inference") if e.healthy]) < 2:
            assert loop.time() < deadline, "the gateway never saw two SERVING sidecars"
            await asyncio.sleep(0.05)

        replies: Counter[str] = Counter()
        errors: list[str] = []
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(serving.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    request = pb.ModelInferRequest(model_name=f"m{n}-{i % 16}")
                    try:
                        reply = await stub.ModelInfer(request, timeout=10)
                        replies[reply.id] += 1
                    except grpc.aio.AioRpcError as error:
                        errors.append(f"{error.code().name}: {error.details()}")

            clients = [asyncio.create_task(client(n)) for n in range(4)]
            deadline = loop.time() + 30
            while min(replies["w1"], replies["w2"]) < 20:
                assert loop.time() < deadline and not errors, (replies, errors)
                await asyncio.sleep(0.05)
            sidecar = processes.running["sidecar-w1"]
            sidecar.send_signal(signal.SIGTERM)
            deadline = loop.time() + 60
            while sidecar.poll() is None:
                assert loop.time() < deadline, "the sidecar never exited"
                await asyncio.sleep(0.05)
            after_exit = replies["w2"]
            while replies["w2"] < after_exit + 50:
                await asyncio.sleep(0.05)
            served_by_w1 = replies["w1"]
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*clients)
    finally:
        await serving.drain(grace=0)
    assert errors == []
    assert sidecar.returncode == 0
    # Nothing reached the stopped sidecar's worker once it had gone.
    assert replies["w1"] == served_by_w1
