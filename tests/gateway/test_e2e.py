"""Multi-process: a gateway process (the CLI) in front of worker processes, one SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.e2e


@contextmanager
def process(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Starts ``python -m args`` and yields it with the address from its first line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, f"{args} did not start: {line!r}"
        yield proc, line.split("listening on ")[1].split()[0]
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli.main", *args],
        cwd=REPO,
        env={**ENV, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def triton_script(address: str) -> str:
    return f"""
import tritonclient.grpc as tc
client = tc.InferenceServerClient("{address}")
assert client.is_server_live()
result = client.infer("resnet", inputs=[], model_version="4")
response = result.get_response()
print(response.model_name, response.model_version, response.id)
"""


async def test_gateway_process_routes_survives_sigkill_and_serves_tritonclient() -> None:
    with (
        process("tests.gateway.backends", "w0") as (w0, a0),
        process("tests.gateway.backends", "w1") as (w1, a1),
        process("tests.gateway.backends", "w2") as (w2, a2),
    ):
        workers = {"w0": w0, "w1": w1, "w2": w2}
        static = [arg for a in (a0, a1, a2) for arg in ("--static", f"inference={a}")]
        with process("mesh.cli.main", "gateway", "--port", "0", "--config", "config", *static) as (
            _,
            gw,
        ):
            async with grpc.aio.insecure_channel(gw) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                request = pb.ModelInferRequest(model_name="resnet", model_version="4")
                owner = (await stub.ModelInfer(request, timeout=10)).id
                assert {(await stub.ModelInfer(request, timeout=10)).id for _ in range(20)} == {
                    owner
                }

                # SIGKILL the owner while 200 idempotent calls are in flight: none is lost.
                calls = [stub.ModelInfer(request, timeout=10) for _ in range(200)]
                workers[owner].send_signal(signal.SIGKILL)
                replies = await asyncio.gather(*calls)
                assert all(r.model_name == "resnet" for r in replies)
                after = [(await stub.ModelInfer(request, timeout=10)).id for _ in range(10)]
                assert owner not in after and len(set(after)) == 1  # converged on one successor

            # tritonclient (in its own process: its protobufs clash with ours) through the gateway.
            out = subprocess.run(
                [sys.executable, "-c", triton_script(gw)],
                cwd=REPO,
                env=ENV,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            name, version, worker = out.stdout.split()
            assert (name, version) == ("resnet", "4") and worker == after[0]

            # The CLI's admin commands against the running gateway.
            explain = cli(
                "route", "explain", "--gateway", gw, "--model", "resnet", "--version", "4"
            )
            assert explain.returncode == 0, explain.stderr
            assert (
                "resnet/4" in explain.stdout and "fields model_name+model_version" in explain.stdout
            )
            rejected = cli("config", "apply", "--gateway", gw, str(REPO / "pyproject.toml"))
            assert rejected.returncode == 1
            assert "pyproject.toml: line 2, column 1: not valid YAML" in rejected.stderr
            applied = cli("config", "apply", "--gateway", gw, "config/examples/canary-90-10.yaml")
            assert (
                applied.returncode == 0
                and "VirtualService/inference: applied as version 2" in applied.stdout
            )
            dump = cli("config", "dump", "--gateway", gw)
            assert "# version 2 from admin" in dump.stdout and "x-model-version" in dump.stdout
