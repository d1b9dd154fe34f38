"""The whole request path, every part its own process: registry, gateway, sidecars, workers.

One mesh per module (starting it is most of the cost): an embedded registry store, the
gateway with ``--es`` (routing from config/ plus the registry's config store), and
``meshserve run inference`` units (worker + sidecar, mutual TLS from ``meshserve certs
init``) serving a small model repository with several names and versions. The tests run
in file order and build on each other's state; the last one kills a worker.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest

from cli.admin_credential import ADMIN_KEY_FILE, ensure_admin_credential
from mesh.balance.report import LoadReport
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from registry.connect import StoreSettings
from registry.embedded import EmbeddedStore
from registry.store import open_store
from tests.gateway.harness import WithMetadata
from tests.support.grpcurl import grpcurl_async
from tests.support.istio_yaml import BAD_SUBSET
from tests.support.processes import ENV, REPO, Launched, cli, group_members
from workers.inference.testing import FP32, MLP, model_config, populate, publish, seeded

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

#: Models with several versions each: what the ring spreads over the workers.
MODELS = {"alpha": 4, "beta": 4, "gamma": 4}
VERSIONS = [(m, str(v)) for m, n in MODELS.items() for v in range(1, n + 1)]
DEADLINE = 30.0


@dataclass
class Unit:
    """One ``meshserve run inference``: the sidecar address (registered) and the worker's."""

    launched: Launched
    sidecar: str
    worker: str

    @property
    def port(self) -> str:
        return self.sidecar.rsplit(":", 1)[1]

    @property
    def registered(self) -> str:
        """The address the sidecar registers (and the gateway routes to)."""
        return f"localhost:{self.port}"


@dataclass
class Mesh:
    store: EmbeddedStore
    gateway: str
    config_dir: Path
    certs: Path
    repo: Path
    units: list[Unit]
    launched: list[Launched] = field(default_factory=list)
    #: The Admin API's key (as `up` makes it: its hash in the gateway's auth file).
    admin_key: str = ""

    def launch_unit(self) -> Launched:
        """Starts ``meshserve run inference``; :meth:`ready` waits for its addresses."""
        launched = Launched(
            "cli.main", "run", "inference",
            "--worker-args", f"--model-repo {self.repo} --threads 1 --poll-interval 0",
            "--mtls=STRICT", f"--certs={self.certs}", "--drain-delay=0.2", "--grace=2",
            f"--es={self.store.url}",
            name=f"inference unit {len(self.launched)}",
        )  # fmt: skip
        self.launched.append(launched)
        return launched

    def ready(self, launched: Launched) -> Unit:
        worker = launched.address("inference worker")
        unit = Unit(launched, launched.address("sidecar"), worker)
        self.units.append(unit)
        return unit

    def start_unit(self) -> Unit:
        return self.ready(self.launch_unit())

    def unit_at(self, address: str) -> Unit:
        port = address.rsplit(":", 1)[1]
        return next(u for u in self.units if u.port == port)


def infer(model: str, version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([0.5, -1.0, 2.0, 0.25])
    return request


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Polls ``check`` until it holds, failing after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.1)


def write_repo(repo: Path) -> None:
    populate(str(repo))  # mlp, intops, textops...: what tests/support/triton_client drives
    for name, count in MODELS.items():
        config = model_config(name, [("x", FP32, [4])], [("y", FP32, [3])], latest=count)
        for version in range(1, count + 1):
            publish(str(repo), config, seeded(MLP(), version))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("mesh")
    repo, certs, config_dir = root / "models", root / "certs", root / "config"
    write_repo(repo)
    shutil.copytree(REPO / "config", config_dir, ignore=shutil.ignore_patterns("examples"))
    made = cli("certs", "init", f"--dir={certs}")
    assert made.returncode == 0, made.stderr
    auth_file = ensure_admin_credential(root / "state")
    admin_key = (root / "state" / ADMIN_KEY_FILE).read_text().strip()
    launched: list[Launched] = []
    with EmbeddedStore(root / "store", advertise=False) as store:
        try:
            gateway = Launched(
                "cli.main", "gateway", "--port=0", f"--config={config_dir}",
                f"--es={store.url}", f"--certs={certs}", "--reload-interval=0.2",
                f"--auth-config={auth_file}", name="gateway",
            )  # fmt: skip
            launched.append(gateway)
            mesh = Mesh(
                store, gateway.address("gateway"), config_dir, certs, repo, [], launched, admin_key
            )
            # Started together: most of their start-up is importing torch.
            for unit in [mesh.launch_unit() for _ in range(3)]:
                mesh.ready(unit)
            yield mesh
        finally:
            for process in launched:
                process.stop(grace=5)
            # No orphan: nothing is left in any group we started (workers included).
            assert group_members({p.pid for p in launched}) == []


@pytest.fixture
async def admin(mesh: Mesh) -> AsyncIterator[admin_pb2_grpc.AdminAsyncStub]:
    key = WithMetadata((("x-api-key", mesh.admin_key),))
    async with grpc.aio.insecure_channel(mesh.gateway, interceptors=[key]) as channel:
        yield admin_pb2_grpc.AdminStub(channel)


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[pb_grpc.GRPCInferenceServiceAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


async def serving_endpoints(admin: admin_pb2_grpc.AdminAsyncStub) -> set[str]:
    reply = await admin.ListEndpoints(admin_pb2.ListEndpointsRequest(host="inference"))
    return {e.address for g in reply.groups if not g.subset for e in g.endpoints if e.healthy}


async def owner(admin: admin_pb2_grpc.AdminAsyncStub, model: str, version: str) -> str:
    reply = await admin.ExplainRoute(
        admin_pb2.ExplainRouteRequest(model_name=model, model_version=version)
    )
    return reply.endpoint


async def inference_counts(mesh: Mesh) -> dict[str, Counter[tuple[str, str]]]:
    """Per worker (by registered address), successful inferences per (model, version)."""
    counts: dict[str, Counter[tuple[str, str]]] = {}
    for unit in mesh.units:
        if unit.launched.process.poll() is not None:
            continue
        async with grpc.aio.insecure_channel(unit.worker) as channel:
            stats = await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(), timeout=10
            )
        counts[unit.registered] = Counter(
            {(s.name, s.version): s.inference_stats.success.count for s in stats.model_stats}
        )
    return counts


def served(
    before: dict[str, Counter[tuple[str, str]]], after: dict[str, Counter[tuple[str, str]]]
) -> dict[tuple[str, str], set[str]]:
    """Which workers served each version between two statistics readings."""
    by_version: dict[tuple[str, str], set[str]] = {}
    for address, counts in after.items():
        for key, count in counts.items():
            if count > before.get(address, Counter())[key]:
                by_version.setdefault(key, set()).add(address)
    return by_version


async def mesh_serving(admin: admin_pb2_grpc.AdminAsyncStub) -> None:
    """Polls until the gateway sees all three inference workers SERVING."""

    async def three() -> bool:
        return len(await serving_endpoints(admin)) == 3

    await until(three, "three SERVING inference endpoints at the gateway")


async def test_mesh_is_up_and_sidecars_publish_the_workers_load(
    mesh: Mesh, admin: admin_pb2_grpc.AdminAsyncStub, stub: pb_grpc.GRPCInferenceServiceAsyncStub
) -> None:
    await mesh_serving(admin)
    # Through the gateway, the worker's load report rides on the trailing metadata.
    call = stub.ModelInfer(infer("alpha", "1"), timeout=10)
    assert (await call).model_version == "1"
    report = LoadReport.from_metadata(list(await call.trailing_metadata() or ()))
    assert "alpha:1" in report.loaded_versions
    holder = await owner(admin, "alpha", "1")

    async def published() -> bool:
        reply = await admin.ListInstances(admin_pb2.ListInstancesRequest(service="inference"))
        return any(
            i.address == holder and ("alpha", "1") in {(m.name, m.version) for m in i.loaded_models}
            for i in reply.instances
        )

    # The sidecar polls the worker each heartbeat and publishes into the registry instance.
    await until(published, "the registry shows alpha:1 loaded on its owner")


async def test_each_version_sticks_to_one_worker(
    mesh: Mesh, admin: admin_pb2_grpc.AdminAsyncStub, stub: pb_grpc.GRPCInferenceServiceAsyncStub
) -> None:
    before = await inference_counts(mesh)
    for model, version in VERSIONS:
        for _ in range(4):
            reply = await stub.ModelInfer(infer(model, version), timeout=10)
            assert (reply.model_name, reply.model_version) == (model, version)
    by_version = served(before, await inference_counts(mesh))
    assert set(by_version) == set(VERSIONS)
    for key, workers in by_version.items():
        assert workers == {await owner(admin, *key)}, key
    # Spread: three workers share twelve versions (not all on one).
    assert len(set().union(*by_version.values())) >= 2


async def test_canary_90_10_by_header_applied_through_the_config_store(
    mesh: Mesh,
    admin: admin_pb2_grpc.AdminAsyncStub,
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
    tmp_path: Path,
) -> None:
    # The README's canary, for this mesh's model alpha instead of demo.
    canary = tmp_path / "canary.yaml"
    canary.write_text(
        (REPO / "config/examples/canary-90-10.yaml")
        .read_text()
        .replace("exact: demo", "exact: alpha")
    )
    applied = cli(
        "config", "apply", "--gateway", mesh.gateway, str(canary), "--api-key", mesh.admin_key,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    dump = await admin.DumpConfig(admin_pb2.DumpConfigRequest())
    assert "store 'routing' v1" in dump.source
    # Written through the store: another gateway (or this one restarted) sees it.
    async with open_store(StoreSettings(url=mesh.store.url)) as store:
        stored = await store.config().current()
    assert stored is not None and stored.version == 1 and "x-model-version" in stored.yaml

    semaphore = asyncio.Semaphore(32)

    async def one() -> str:
        async with semaphore:
            reply = await stub.ModelInfer(infer("alpha"), timeout=20)
            return reply.model_version

    versions = Counter(await asyncio.gather(*(one() for _ in range(2000))))
    assert set(versions) == {"1", "2"}
    # The worker honours x-model-version (the request names none): the versions it reports.
    assert abs(versions["2"] / 2000 - 0.10) <= 0.03, versions
    # Another model keeps its latest version: the canary matches alpha only.
    others = [await stub.ModelInfer(infer("beta"), timeout=20) for _ in range(50)]
    assert {r.model_version for r in others} == {str(MODELS["beta"])}


FAULT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: inference
spec:
  hosts: [inference]
  gateways: [meshserve-gateway, mesh]
  http:
    - name: chaos
      match:
        - headers:
            x-chaos: {exact: "on"}
      fault:
        abort:
          grpcStatus: UNAVAILABLE
          percentage: {value: 25}
      route:
        - destination: {host: inference}
    - name: rest
      route:
        - destination: {host: inference}
"""


async def test_fault_injection_hits_its_percentage(
    mesh: Mesh, admin: admin_pb2_grpc.AdminAsyncStub, stub: pb_grpc.GRPCInferenceServiceAsyncStub
) -> None:
    reply = await admin.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=FAULT))
    assert reply.resources == ["VirtualService/inference"]

    async def one() -> bool:
        try:
            await stub.ModelInfer(infer("beta", "2"), metadata=(("x-chaos", "on"),), timeout=10)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and "fault injected" in str(
                exc.details()
            )
            return False
        return True

    n = 400
    aborted = sum(not ok for ok in await asyncio.gather(*(one() for _ in range(n))))
    # Binomial(400, 0.25): mean 100, sd 8.7; 4 sd either side.
    assert 65 <= aborted <= 135, aborted
    # Requests without the header are untouched.
    assert all([await one_plain(stub) for _ in range(20)])


async def one_plain(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> bool:
    return (await stub.ModelInfer(infer("beta", "2"), timeout=10)).model_version == "2"


async def test_a_broken_config_is_rejected_and_the_old_one_keeps_routing(
    mesh: Mesh, admin: admin_pb2_grpc.AdminAsyncStub, stub: pb_grpc.GRPCInferenceServiceAsyncStub
) -> None:
    await mesh_serving(admin)  # when run alone, nothing before it waited
    running = await admin.DumpConfig(admin_pb2.DumpConfigRequest())
    # Through the admin API (which writes through the store): refused before the store.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=BAD_SUBSET))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nowhere" in str(refused.value.details())

    # Straight into the store by another writer (it parses, but names an unknown subset):
    # the gateway's watch rejects it.
    # (The store may hold no version yet when this test runs alone: 0 means none.)
    async with open_store(StoreSettings(url=mesh.store.url)) as store:
        current = await store.config().current()
        based_on = current.version if current is not None else 0
        await store.config().apply(BAD_SUBSET, expected_version=based_on)

    async def rejected(source: str) -> bool:
        dump = await admin.DumpConfig(admin_pb2.DumpConfigRequest())
        return source in dump.last_rejection.source

    await until(lambda: rejected(f"v{based_on + 1}"), "the store version is rejected")
    dump = await admin.DumpConfig(admin_pb2.DumpConfigRequest())
    assert dump.version == running.version and "nowhere" in dump.last_rejection.error
    assert await one_plain(stub)

    # A broken file in the config folder.
    broken = mesh.config_dir / "broken.yaml"
    broken.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nspec: [\n")
    try:
        await until(lambda: rejected(str(mesh.config_dir)), "the broken file is rejected")
        dump = await admin.DumpConfig(admin_pb2.DumpConfigRequest())
        assert dump.version == running.version and "broken.yaml" in dump.last_rejection.error
        assert await one_plain(stub)
    finally:
        broken.unlink()

    # Back to good: applying through the admin builds on the last good store version.
    restore = (REPO / "config" / "inference.yaml").read_text()
    reply = await admin.ApplyConfig(admin_pb2.ApplyConfigRequest(yaml=restore))
    assert reply.version > running.version
    assert await one_plain(stub)


async def test_tritonclient_through_the_gateway(mesh: Mesh) -> None:
    inputs = {"x": [[0.5, -1.0, 2.0, 0.25]], "ids": [[1, 2, 3, 4]], "text": ["mesh"]}
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.triton_client", mesh.gateway],
        cwd=REPO,
        env=ENV,
        input=json.dumps(inputs),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert (results["live"], results["ready"], results["model_ready"]) == (True, True, True)
    assert results["int64_total"] == [[10]] and results["bytes_upper"] == [["MESH"]]
    assert results["async"] == results["fp32"] and results["stream"] == {"0": results["fp32"]}


def stream_request(model: str, version: str) -> str:
    """A ModelInferRequest in grpcurl's JSON (proto field names, typed contents)."""
    return json.dumps(
        {
            "model_name": model,
            "model_version": version,
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "contents": {"fp32_contents": [0.5, -1.0, 2.0, 0.25]},
                }
            ],
        }
    )


def at(address: str, *options: str) -> tuple[str, ...]:
    """grpcurl's arguments up to the address (options first), for a plaintext ``host:port``
    or ``unix:PATH``; the command follows."""
    if address.startswith("unix:"):
        return ("-plaintext", "-unix", *options, address.removeprefix("unix:"))
    return ("-plaintext", *options, address)


async def test_real_grpcurl_through_the_gateway_and_on_a_worker(
    mesh: Mesh, admin: admin_pb2_grpc.AdminAsyncStub
) -> None:
    """What a grpcurl user does, with grpcurl 1.8.6 itself: list, describe, a unary call
    and ModelStreamInfer (bidirectional) fed from stdin, through the gateway and straight
    at a worker. (Descriptor file names are not asserted: only services and methods.)"""
    await mesh_serving(admin)  # when run alone, nothing before it waited
    worker = mesh.units[0].worker
    for target, services in (
        (mesh.gateway, {"inference.GRPCInferenceService", "meshserve.mesh.v1.Admin"}),
        (worker, {"inference.GRPCInferenceService", "grpc.health.v1.Health"}),
    ):
        listed = await grpcurl_async(*at(target), "list")
        assert listed.returncode == 0, listed.stderr
        assert services <= set(listed.stdout.split()), listed.stdout
        described = await grpcurl_async(*at(target), "describe", "inference.GRPCInferenceService")
        assert described.returncode == 0, described.stderr
        for rpc in ("rpc ModelInfer", "rpc ModelStreamInfer", "rpc ServerReady"):
            assert rpc in described.stdout, described.stdout
        (metadata,) = (
            await grpcurl_async(
                *at(target, "-d", '{"name": "alpha"}'),
                "inference.GRPCInferenceService/ModelMetadata",
            )
        ).messages()
        assert metadata["name"] == "alpha" and metadata["inputs"][0]["name"] == "x"
        # Bidirectional: two requests from stdin, a response for each. (grpcurl prints the
        # proto's own field names.)
        stdin = stream_request("alpha", "1") + "\n" + stream_request("alpha", "2")
        replies = (
            await grpcurl_async(
                *at(target, "-d", "@"),
                "inference.GRPCInferenceService/ModelStreamInfer",
                stdin=stdin,
            )
        ).messages()
        versions = sorted(r["infer_response"]["model_version"] for r in replies)
        assert versions == ["1", "2"], replies
        assert all(len(r["infer_response"]["raw_output_contents"]) == 1 for r in replies)


async def test_a_fourth_worker_takes_about_a_quarter_of_the_versions(
    mesh: Mesh, admin: admin_pb2_grpc.AdminAsyncStub, stub: pb_grpc.GRPCInferenceServiceAsyncStub
) -> None:
    keys = [("alpha", str(v)) for v in range(1, 301)]
    old = {key: await owner(admin, *key) for key in keys}
    new_address = mesh.start_unit().registered

    async def four() -> bool:
        return new_address in await serving_endpoints(admin)

    await until(four, "the fourth worker is on the ring")
    now = {key: await owner(admin, *key) for key in keys}
    moved = [key for key in keys if now[key] != old[key]]
    assert {now[key] for key in moved} == {new_address}  # only to the new worker
    assert 0.12 <= len(moved) / len(keys) <= 0.40, len(moved)

    # Real traffic follows the new ring.
    before = await inference_counts(mesh)
    for model, version in VERSIONS:
        await stub.ModelInfer(infer(model, version), timeout=10)
    by_version = served(before, await inference_counts(mesh))
    assert set(by_version) == set(VERSIONS)
    for key, workers in by_version.items():
        assert workers == {await owner(admin, *key)}, key


async def test_sigkill_under_load_loses_no_idempotent_request(
    mesh: Mesh, admin: admin_pb2_grpc.AdminAsyncStub, stub: pb_grpc.GRPCInferenceServiceAsyncStub
) -> None:
    victim_address = await owner(admin, "gamma", "3")
    victim = mesh.unit_at(victim_address)
    semaphore = asyncio.Semaphore(16)
    done: list[str] = []
    under_way = asyncio.Event()

    async def one() -> str:
        async with semaphore:
            version = (await stub.ModelInfer(infer("gamma", "3"), timeout=20)).model_version
        done.append(version)
        if len(done) == 50:
            under_way.set()
        return version

    calls = [asyncio.create_task(one()) for _ in range(300)]
    await asyncio.wait_for(under_way.wait(), DEADLINE)  # 16 in flight from here on
    victim.launched.kill()  # worker and sidecar at once: no drain, no deregistration
    assert Counter(await asyncio.gather(*calls)) == {"3": 300}

    async def converged() -> bool:
        return victim_address not in await serving_endpoints(admin)

    # The lease expires; every gateway ring drops the dead endpoint.
    await until(converged, "the killed worker leaves the ring")
    successor = await owner(admin, "gamma", "3")
    assert successor not in ("", victim_address)
    assert all([await one() == "3" for _ in range(10)])
