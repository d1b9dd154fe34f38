"""Processes: gateway → sidecars (mTLS, STRICT) → workers; SIGTERM a sidecar under load."""

from __future__ import annotations

import asyncio
import json
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
from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from mesh.security.rotation import CertificateSource
from mesh.server.app import ServerSettings
from mesh.telemetry.interceptors import TelemetryClientInterceptor
from mesh.telemetry.setup import TelemetrySettings, setup
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.discovery import RegistryDiscovery
from registry.schema import Indices
from registry.store import Store

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class Processes:
    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, *args: str, expect: str, traces: Path | None = None) -> str:
        env = dict(ENV)
        if traces is not None:
            env["MESHSERVE_TRACES"] = f"file:{traces}"
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=env,
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
        app = processes.start(
            name, "tests.mesh.sidecar.worker_proc", name, expect=f"{name} listening on "
        ).split()[3]
        processes.start(
            f"sidecar-{name}",
            "cli.main",
            "sidecar",
            "--service=inference",
            f"--instance-id=inference-{name}",
            f"--app={app}",
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
        # The relay dials the sidecars itself, with the same identity.
        tls_context=gateway_certs.ssl_client_context,
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


@pytest.mark.e2e
async def test_one_trace_from_client_through_gateway_and_sidecar_to_worker(
    tmp_path: Path, processes: Processes, indices: Indices, store_url: str
) -> None:
    CertificateAuthority.create("cluster.local").save(tmp_path / "certs")
    store = (f"--es={store_url}", f"--prefix={indices.prefix}")
    app = processes.start(
        "worker",
        "tests.mesh.sidecar.worker_proc",
        "w1",
        expect="w1 listening on ",
        traces=tmp_path / "worker.jsonl",
    ).split()[3]
    processes.start(
        "sidecar",
        "cli.main",
        "sidecar",
        "--service=inference",
        f"--app={app}",
        "--mtls=STRICT",
        f"--certs={tmp_path / 'certs'}",
        *store,
        expect="sidecar listening on ",
        traces=tmp_path / "sidecar.jsonl",
    )
    line = processes.start(
        "gateway",
        "cli.main",
        "gateway",
        "--port=0",
        f"--config={REPO / 'config'}",
        f"--certs={tmp_path / 'certs'}",
        *store,
        expect="gateway listening on ",
        traces=tmp_path / "gateway.jsonl",
    )
    address = line.split()[3]
    telemetry = setup(TelemetrySettings(traces="memory"))
    loop = asyncio.get_running_loop()
    request = pb.ModelInferRequest(model_name="m", model_version="7")
    async with grpc.aio.insecure_channel(address) as plain:
        # Ready once the gateway has discovered the sidecar and it mirrors SERVING.
        deadline = loop.time() + 30
        while True:
            try:
                await pb_grpc.GRPCInferenceServiceStub(plain).ModelInfer(request, timeout=10)
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() is grpc.StatusCode.UNAVAILABLE, error
                assert loop.time() < deadline, "the gateway never routed to the sidecar"
                await asyncio.sleep(0.1)
    async with grpc.aio.insecure_channel(
        address, interceptors=[TelemetryClientInterceptor(telemetry)]
    ) as traced:
        reply = await pb_grpc.GRPCInferenceServiceStub(traced).ModelInfer(request, timeout=10)
    assert reply.id == "w1"
    assert telemetry.spans is not None
    deadline = loop.time() + 10
    while not telemetry.spans.get_finished_spans():
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    (client,) = telemetry.spans.get_finished_spans()
    assert client.context is not None
    trace_id = f"0x{client.context.trace_id:032x}"
    # Each process writes its span when the span ends; a relay (gateway, sidecar) ends its
    # own once it has forwarded the trailers, so the reply may reach us first: poll.
    spans = {}
    deadline = loop.time() + 10
    for process in ("gateway", "sidecar", "worker"):
        while True:
            text = (tmp_path / f"{process}.jsonl").read_text()
            lines = text[: text.rfind("\n") + 1].splitlines()  # not a line being written
            found = [s for s in map(json.loads, lines) if s["context"]["trace_id"] == trace_id]
            if found:
                break
            assert loop.time() < deadline, f"no span of the trace in {process}.jsonl"
            await asyncio.sleep(0.05)
        (spans[process],) = found
    assert spans["gateway"]["parent_id"] == f"0x{client.context.span_id:016x}"
    assert spans["sidecar"]["parent_id"] == spans["gateway"]["context"]["span_id"]
    assert spans["worker"]["parent_id"] == spans["sidecar"]["context"]["span_id"]
    gateway_attributes = spans["gateway"]["attributes"]
    assert gateway_attributes["rpc.method"] == "ModelInfer"
    assert gateway_attributes["meshserve.route"]
    assert gateway_attributes["meshserve.endpoint"].startswith("localhost:")
    assert gateway_attributes["meshserve.retry_count"] == 0
    assert gateway_attributes["meshserve.hash_key"] == "m/7"
    assert spans["worker"]["attributes"]["rpc.grpc.status_code"] == 0
    telemetry.shutdown()
