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

from cli.admin_credential import ensure_admin_credential
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


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        env={**ENV, "COLUMNS": "200", **(env or {})},
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


async def test_gateway_process_routes_survives_sigkill_and_serves_tritonclient(
    tmp_path: Path,
) -> None:
    # As `up` does: an admin key in a state folder, its hash in the gateway's auth file.
    state = tmp_path / "state"
    auth_file = ensure_admin_credential(state)
    # The CLI finds the key in the state folder (no --api-key, no $MESHSERVE_ADMIN_KEY).
    admin_env = {"MESHSERVE_STATE_DIR": str(state), "MESHSERVE_ADMIN_KEY": ""}
    with (
        process("tests.gateway.backends", "w0") as (w0, a0),
        process("tests.gateway.backends", "w1") as (w1, a1),
        process("tests.gateway.backends", "w2") as (w2, a2),
    ):
        workers = {"w0": w0, "w1": w1, "w2": w2}
        static = [arg for a in (a0, a1, a2) for arg in ("--static", f"inference={a}")]
        gateway_args = ("gateway", "--port", "0", "--config", "config", "--auth-config")
        with process("cli.main", *gateway_args, str(auth_file), *static) as (_, gw):
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
                "route", "explain", "--gateway", gw, "--model", "resnet", "--version", "4",
                env=admin_env,
            )  # fmt: skip
            assert explain.returncode == 0, explain.stderr
            assert (
                "resnet/4" in explain.stdout and "fields model_name+model_version" in explain.stdout
            )
            assert "1. view ingress (labels app=gateway" in explain.stdout
            in_mesh = cli(
                "route", "explain", "--gateway", gw, "--mesh", "--model", "resnet", env=admin_env
            )
            assert in_mesh.returncode == 0, in_mesh.stderr
            assert "1. view mesh: the sidecars' rules" in in_mesh.stdout
            # Without the key (another state folder): Admin is refused.
            keyless = cli(
                "config", "dump", "--gateway", gw,
                env={"MESHSERVE_STATE_DIR": str(tmp_path / "elsewhere")},
            )  # fmt: skip
            assert keyless.returncode == 1 and "UNAUTHENTICATED" in keyless.stderr
            rejected = cli(
                "config", "apply", "--gateway", gw, str(REPO / "pyproject.toml"), env=admin_env
            )
            assert rejected.returncode == 1
            assert "pyproject.toml: line 2, column 1: not valid YAML" in rejected.stderr
            canary = "config/examples/canary-90-10.yaml"
            # A dry run prints how routing would change and applies nothing.
            dry = cli("apply", "--dry-run", "--gateway", gw, "-f", canary, env=admin_env)
            assert dry.returncode == 0, dry.stderr
            assert "valid (dry run over version 1)" in dry.stdout
            assert "~ inference http[0] (infer → canary): uri prefix" in dry.stdout
            assert "→ model exact 'demo' and uri prefix" in dry.stdout
            assert "inference 90%, inference 10%" in dry.stdout
            applied = cli("config", "apply", "--gateway", gw, canary, env=admin_env)
            assert (
                applied.returncode == 0
                and "VirtualService/inference: applied as version 2" in applied.stdout
            ), applied.stderr
            dump = cli("config", "dump", "--gateway", gw, env=admin_env)
            assert "# version 2 from config + admin" in dump.stdout
            assert "x-model-version" in dump.stdout
            # A host that does not exist is refused, naming the field; routing is unchanged.
            bad = tmp_path / "bad.yaml"
            bad.write_text(
                (REPO / canary).read_text().replace("host: inference", "host: nosuchservice")
            )
            refused = cli("apply", "--gateway", gw, "-f", str(bad), env=admin_env)
            assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
            assert "'nosuchservice' is not a registered service" in refused.stderr
            # One command restores the config before the canary.
            rolled = cli("config", "rollback", "--gateway", gw, env=admin_env)
            assert rolled.returncode == 0, rolled.stderr
            assert "restored as version 3 the config before version 2" in rolled.stdout
            dump = cli("config", "dump", "--gateway", gw, env=admin_env)
            assert "# version 3 from config," in dump.stdout and "name: canary" not in dump.stdout
