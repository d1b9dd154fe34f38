"""Many hosts, proven on one machine: `meshserve hosts up` runs the mesh across hosts A-D
(network namespaces on a bridge) and the tour runs across them.

Host A holds the store and the data worker, B the gateway, C and D an inference unit each
(C and D also a training node each: DDP across them). The checks: every sidecar registered its own host's address
and its certificate names it (mTLS STRICT: plaintext is refused, a mesh certificate that
verifies the dialled IP gets in); train, infer and a 90/10 canary through the gateway; one
trace with spans from three hosts; and cutting the serving host's link moves its traffic
within the lease TTL with no failed call, restoring it brings the host back into the ring.

Needs root and iproute2 (CI runs as root); skipped otherwise.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cli import netns
from cli.admin_credential import admin_metadata
from cli.hosts import traces_file
from mesh.security.ca import CertificateAuthority
from mesh.security.identity import WorkloadIdentity
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from tests.support.fleet import served_by_every_worker
from tests.support.load import InferLoad, demo_request
from tests.support.up import ENV, ROOT, Up, cli, kill_leftovers

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(420),
    pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable())),
]

NETWORK = netns.Network()
GATEWAY = f"{NETWORK.host('b').address}:8080"
#: A sidecar's lease (mesh/sidecar/app.py) plus the gateway's watch and a loaded machine's
#: slack: how long a cut host may still be routed to.
MOVED_WITHIN_S = 15.0
#: A short per-try timeout and connect timeout: a call sent to a host whose link was just
#: cut (no reset comes back) is tried again on the ring successor within seconds.
FAILOVER_YAML = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: inference
spec:
  hosts: [inference]
  gateways: [meshserve-gateway, mesh]
  http:
    - name: infer
      retries:
        attempts: 3
        perTryTimeout: 2s
        retryOn: unavailable,cancelled,deadline-exceeded,connect-failure,refused-stream
      route:
        - destination:
            host: inference
"""


class HostsUp(Up):
    """One `meshserve hosts up` subprocess (the helpers of `up`'s tests apply as they are)."""

    def __init__(self, state: Path, log: Path) -> None:
        self.state = state
        self.log = log
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli.main",
                    "hosts",
                    "up",
                    "--traces",
                    "--state-dir",
                    str(state),
                ],
                cwd=ROOT,
                env=ENV,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
            )


def poll(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostsUp]:
    base = tmp_path_factory.mktemp("hosts")
    running = HostsUp(base / "state", base / "hosts.log")
    try:
        running.wait_ready()
        yield running
    finally:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGINT)
            try:
                running.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                running.kill()
        kill_leftovers(running.state)
        netns.destroy(NETWORK)


def routed(state: Path, host: str = "inference") -> set[str]:
    """The endpoints of ``host`` the gateway routes to now (healthy, not ejected)."""
    with grpc.insecure_channel(GATEWAY) as channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).ListEndpoints(
                admin_pb2.ListEndpointsRequest(host=host),
                timeout=5,
                metadata=admin_metadata(None, state),
            )
        except grpc.RpcError:
            return set()
    return {
        e.address
        for g in reply.groups
        if not g.subset
        for e in g.endpoints
        if e.healthy and not e.ejected
    }


def spans(state: Path, host: str) -> list[dict[str, object]]:
    path = traces_file(state, host)
    if not path.exists():
        return []
    text = path.read_text()
    # Up to the last newline: a line being written is not a span yet.
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def model_infers(state: Path) -> list[dict[str, object]]:
    """The gateway's ModelInfer spans, oldest first."""
    return [s for s in spans(state, "b") if str(s["name"]).endswith("/ModelInfer")]


def trace_id(span: dict[str, object]) -> str:
    context = span["context"]
    assert isinstance(context, dict)
    return str(context["trace_id"])


def infer_versions(count: int) -> Counter[str]:
    with grpc.insecure_channel(GATEWAY) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        return Counter(infer(demo_request(), timeout=10).model_version for _ in range(count))


def run(*args: str, state: Path, timeout: float = 120.0) -> str:
    done = cli(*args, timeout=timeout, env={"MESHSERVE_STATE_DIR": str(state)})
    assert done.returncode == 0, f"meshserve {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_tour_runs_across_four_hosts(hosts: HostsUp, tmp_path: Path) -> None:
    state = hosts.state
    addresses = {h.name: h.address for h in NETWORK.hosts}
    units = hosts.units()
    # Each unit listens on, and registered, its own host's address.
    assert units["store"]["address"] == f"http://{addresses['a']}:9200"
    for slug, host in (("inference-worker-on-c", "c"), ("inference-worker-on-d", "d")):
        assert units[slug]["address"].startswith(addresses[host] + ":"), units
    inference = {units[s]["address"] for s in ("inference-worker-on-c", "inference-worker-on-d")}
    # hosts up is ready only once the gateway routes to every worker: checked at once.
    assert routed(state) == inference
    assert routed(state, "training") and routed(state, "data")

    # mTLS STRICT between hosts: a plaintext caller is refused; a mesh certificate gets in,
    # and the sidecar's certificate verifies as the IP address the gateway dials.
    sidecar_c = units["inference-worker-on-c"]["address"]
    with grpc.insecure_channel(sidecar_c) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
        # Answered at once by the sidecar's TLS door, naming what it wants.
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "requires mutual TLS" in (refused.value.details() or "")
    ca = CertificateAuthority.load(state / "certs")
    client = ca.issue(WorkloadIdentity(ca.trust_domain, "default", "tester"))
    client.save(tmp_path / "client")
    context = ssl.create_default_context(cafile=str(tmp_path / "client" / "ca.pem"))
    context.load_cert_chain(tmp_path / "client" / "cert.pem", tmp_path / "client" / "key.pem")
    context.set_alpn_protocols(["h2"])
    host, port = sidecar_c.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:  # checks the IP SAN
            assert tls.selected_alpn_protocol() == "h2"

    # Train version 1 with DDP across hosts: rank 0 on C (the training worker that took the
    # job), rank 1 on D (the follower), gloo between them; both read batches from A.
    run(
        "datasets",
        "create",
        "demo-blobs",
        "--source",
        "blobs",
        "--num-examples",
        "600",
        "--num-classes",
        "3",
        "--num-features",
        "4",
        state=state,
    )
    trained = run(
        *("train", "demo", "--dataset", "demo-blobs", "--epochs", "1", "--world-size", "2"),
        state=state,
    )
    # train returns once every inference worker serves what it published.
    assert "served by every inference worker: demo version 1" in trained, trained
    follower = (state / "logs" / "training-node-worker-on-d.log").read_text()
    joined = re.search(r"rank 1 of 2 joined job (\w+) at 10\.77\.0\.3:29400", follower)
    assert joined, follower[-2000:]
    assert f"rank 1 finished job {joined[1]}" in follower

    def serves(version: str) -> Callable[[], bool]:
        def check() -> bool:
            try:
                return infer_versions(1) == Counter({version: 1})
            except grpc.RpcError:
                return False

        return check

    assert serves("1")()

    # A trace across three hosts: SubmitJob enters the gateway (B), reaches the training
    # worker's sidecar (C), whose worker looks the dataset up through its outbound, in the
    # data worker's sidecar (A).
    trained = run("train", "demo", "--dataset", "demo-blobs", "--epochs", "1", state=state)
    assert "served by every inference worker: demo version 2" in trained, trained
    by_trace: dict[str, set[str]] = {}
    for host in ("a", "b", "c"):
        for span in spans(state, host):
            by_trace.setdefault(trace_id(span), set()).add(host)
    submits = {trace_id(s) for s in spans(state, "b") if str(s["name"]).endswith("/SubmitJob")}
    assert submits and any(by_trace[t] == {"a", "b", "c"} for t in submits), by_trace

    # A 90/10 canary by version with the Istio example, through the gateway on B: both
    # workers serve both versions (train waited for it; checked through the fleet's index).
    served_by_every_worker(GATEWAY, "demo", timeout=0)
    run("apply", "-f", str(ROOT / "config" / "examples" / "canary-90-10.yaml"), state=state)
    poll("version 2 to serve", lambda: "2" in infer_versions(20), 60)
    versions = infer_versions(100)
    assert set(versions) == {"1", "2"} and versions["1"] > versions["2"], versions


def test_cutting_a_hosts_link_moves_its_traffic_and_restoring_it_brings_it_back(
    hosts: HostsUp, tmp_path: Path
) -> None:
    state = hosts.state
    units = hosts.units()
    inference = {units[s]["address"] for s in ("inference-worker-on-c", "inference-worker-on-d")}
    failover = tmp_path / "failover.yaml"
    failover.write_text(FAILOVER_YAML)
    run("apply", "-f", str(failover), state=state)
    poll("the gateway to route to both inference hosts", lambda: routed(state) == inference, 60)
    earlier = len(model_infers(state))
    with InferLoad(GATEWAY, callers=3) as load:
        began = time.monotonic()
        poll("the load to get through", lambda: load.succeeded_after(began), 30)
        # Cut the host that serves the demo model now (the ring keeps it on one): a span of
        # this load's, not of the test before (the gateway writes it after the reply).
        poll("the load's spans", lambda: len(model_infers(state)) > earlier, 30)
        attributes = model_infers(state)[-1]["attributes"]
        assert isinstance(attributes, dict)
        serving = str(attributes["meshserve.endpoint"])
        name = next(h.name for h in NETWORK.hosts if serving.startswith(h.address + ":"))
        other = (inference - {serving}).pop()
        cut = time.monotonic()
        netns.set_link(NETWORK, name, up=False)
        poll(f"the gateway to stop routing to {serving}", lambda: routed(state) == {other}, 60)
        moved = time.monotonic()
        moved_after = moved - cut
        poll("calls after the move", lambda: load.succeeded_after(moved + 1), 30)
        netns.set_link(NETWORK, name, up=True)
        poll(f"{serving} to come back into the ring", lambda: routed(state) == inference, 60)
        back = time.monotonic()
        poll("calls after the return", lambda: load.succeeded_after(back + 2), 30)
    failed = [o for o in load.outcomes if o.code is not None]
    assert not failed, f"{len(failed)} of {len(load.outcomes)} calls failed: {failed[:5]}"
    assert moved_after < MOVED_WITHIN_S, f"traffic moved after {moved_after:.1f} s"
    print(
        f"host {name} cut: routed elsewhere after {moved_after:.1f} s, {len(load.outcomes)} calls"
    )


def test_stopping_removes_every_host(hosts: HostsUp) -> None:
    hosts.process.send_signal(signal.SIGINT)
    assert hosts.process.wait(timeout=60) == 0, hosts.output()[-3000:]
    assert not netns.exists(NETWORK)
