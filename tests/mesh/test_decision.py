"""The whole routing decision, pure: config + endpoints + request → endpoint order, explained."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import grpc
import pytest

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import Endpoint, EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.config.loader import load_path, parse_yaml
from mesh.config.snapshot import MeshConfig, config_from_path, config_from_yaml
from mesh.errors import Unimplemented
from mesh.routing.decision import RequestInfo, decide
from mesh.routing.discovery import StaticInstance
from mesh.routing.hashkey import RequestFields
from protos.inference import grpc_service_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
INFER = "/inference.GRPCInferenceService/ModelInfer"
DEFAULT = config_from_path(REPO / "config")
CANARY = DEFAULT.merged(
    load_path(REPO / "config" / "examples" / "canary-90-10.yaml"), version=2, source="canary"
)


def workers(n: int, service: str = "inference", **labels: str) -> list[StaticInstance]:
    return [
        StaticInstance(service, f"{service}-{i}", f"10.0.0.{i}:8001", dict(labels))
        for i in range(n)
    ]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def clusters(
    config: MeshConfig, instances: list[StaticInstance], tracker: LoadTracker | None = None
) -> ClusterMap:
    return ClusterMap(
        config, EndpointsSnapshot.from_instances(instances), tracker or LoadTracker(), Clock()
    )


def infer(name: str, version: str = "", **metadata: str) -> RequestInfo:
    message = pb.ModelInferRequest(model_name=name, model_version=version).SerializeToString()
    return RequestInfo(INFER, tuple(metadata.items()), message=message)


def test_one_version_sticks_to_one_worker() -> None:
    cm = clusters(DEFAULT, workers(3))
    rng = random.Random(1)
    chosen = {decide(cm, infer("resnet", "3"), rng).endpoint for _ in range(50)}
    assert len(chosen) == 1
    decision = decide(cm, infer("resnet", "3"), rng)
    assert decision.hash_key is not None and decision.hash_key.key == "resnet/3"
    assert decision.route == "VirtualService/inference http[0] (infer)"
    assert decision.timeout == 60.0 and decision.retries.attempts == 2
    # Retry order: every other worker, distinct, after the chosen one.
    assert len(set(decision.candidates)) == 3


def test_versions_spread_and_a_fourth_worker_moves_about_a_quarter() -> None:
    rng = random.Random(1)
    keys = [(f"m{i}", str(v)) for i in range(50) for v in range(1, 5)]
    three = clusters(DEFAULT, workers(3))
    four = clusters(DEFAULT, workers(4))
    before = {k: decide(three, infer(*k), rng).endpoint for k in keys}
    after = {k: decide(four, infer(*k), rng).endpoint for k in keys}
    assert len(set(before.values())) == 3
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] is not None and after[k].address == "10.0.0.3:8001" for k in moved)  # type: ignore[union-attr]
    assert 0.15 < len(moved) / len(keys) < 0.35


def test_canary_splits_demo_90_10_and_sets_the_version_header() -> None:
    cm = clusters(CANARY, workers(3))
    rng = random.Random(5)
    versions: Counter[str] = Counter()
    for _ in range(2000):
        decision = decide(cm, infer("demo"), rng)
        headers = dict(decision.metadata)
        versions[headers["x-model-version"]] += 1
        assert decision.hash_key is not None
        assert decision.hash_key.key == f"demo/{headers['x-model-version']}"
        # The canary keeps the default infer rule's timeout and retries.
        assert decision.timeout == 60.0 and decision.retries.per_try_timeout == 30.0
    assert versions["2"] / 2000 == pytest.approx(0.10, abs=0.03)
    pinned = decide(cm, infer("demo", **{"x-model-version": "7"}), rng)
    assert pinned.route.endswith("(infer)") and dict(pinned.metadata)["x-model-version"] == "7"


def test_canary_leaves_other_models_alone() -> None:
    cm = clusters(CANARY, workers(3))
    rng = random.Random(5)
    for name in ("simple", "demo-2", "Demo"):
        for _ in range(50):
            decision = decide(cm, infer(name), rng)
            assert "x-model-version" not in dict(decision.metadata), name
            assert decision.route == "VirtualService/inference http[2] (infer)"
            assert decision.hash_key is not None and decision.hash_key.key == f"{name}/latest"
            assert decision.timeout == 60.0 and decision.retries.attempts == 2


def test_canary_splits_demo_streams_by_their_first_message() -> None:
    cm = clusters(CANARY, workers(3))
    stream = "/inference.GRPCInferenceService/ModelStreamInfer"
    message = pb.ModelInferRequest(model_name="demo").SerializeToString()
    decision = decide(cm, RequestInfo(stream, message=message), random.Random(1))
    assert decision.route.endswith("(canary-stream)") and decision.timeout is None
    other = pb.ModelInferRequest(model_name="simple").SerializeToString()
    decision = decide(cm, RequestInfo(stream, message=other), random.Random(1))
    assert decision.route.endswith("(control)")
    assert "x-model-version" not in dict(decision.metadata)


@pytest.mark.parametrize(
    ("method", "message", "expected"),
    [
        # A compressed or unreadable first message names no model: the default rules.
        (INFER, b"\xff\xff", "(infer)"),
        (INFER, None, "(infer)"),
        # ModelMetadata names a model too, but the canary's uri is ModelInfer only.
        (
            "/inference.GRPCInferenceService/ModelMetadata",
            pb.ModelMetadataRequest(name="demo").SerializeToString(),
            "(control)",
        ),
    ],
)
def test_canary_needs_a_readable_model_name(
    method: str, message: bytes | None, expected: str
) -> None:
    cm = clusters(CANARY, workers(3))
    decision = decide(cm, RequestInfo(method, message=message), random.Random(1))
    assert decision.route.endswith(expected)
    assert "x-model-version" not in dict(decision.metadata)


def test_explanation_names_the_model_a_rule_matched() -> None:
    cm = clusters(CANARY, workers(3))
    request = RequestInfo(INFER, fields=RequestFields("demo", ""))
    text = "\n".join(decide(cm, request, random.Random(0), explain=True).explanation)
    assert "the request names model 'demo'" in text
    assert "(canary) matches (model exact 'demo' and uri prefix" in text


def test_explanation_tells_the_story() -> None:
    cm = clusters(DEFAULT, workers(3))
    request = RequestInfo(INFER, fields=RequestFields("resnet", ""))
    decision = decide(cm, request, random.Random(0), explain=True)
    text = "\n".join(decision.explanation)
    assert "method /inference.GRPCInferenceService/ModelInfer is for host inference" in text
    assert "VirtualService/inference http[0] (infer) matches (uri prefix" in text
    assert "hash key 'resnet/latest' from fields model_name+model_version" in text
    assert f"endpoint {decision.candidates[0].address} of inference" in text
    # The proxy's hot path builds no explanation; the decision itself is the same.
    quiet = decide(cm, request, random.Random(0))
    assert quiet.explanation == () and quiet.candidates == decision.candidates


def test_no_healthy_endpoint_gives_empty_candidates_naming_the_target() -> None:
    sick = [
        StaticInstance("inference", "i0", "10.0.0.1:1", status="NOT_SERVING"),
        StaticInstance("inference", "i1", "10.0.0.2:1", status="DRAINING"),
    ]
    decision = decide(clusters(DEFAULT, sick), infer("m", "1"), random.Random(0), explain=True)
    assert decision.candidates == ()
    assert decision.explanation[-1] == "no healthy endpoint for inference"


def test_unknown_methods_are_unimplemented() -> None:
    cm = clusters(DEFAULT, workers(1))
    with pytest.raises(Unimplemented, match="not served by any mesh service"):
        decide(cm, RequestInfo("/some.Other/Call"), random.Random(0))
    with pytest.raises(Unimplemented, match="malformed method path"):
        decide(cm, RequestInfo("nonsense"), random.Random(0))


SUBSETS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - match: [{headers: {x-lane: {exact: gpu}}}]
      headers: {request: {remove: [x-lane]}}
      route:
        - destination: {host: inference, subset: gpu}
          headers: {request: {add: {x-routed: gpu}}}
      retries: {attempts: 4, retryOn: "unavailable,internal"}
      fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 5}}}
      mirror: {host: inference, subset: cpu}
    - route: [{destination: {host: inference, subset: cpu}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
    - {name: gpu, labels: {accelerator: gpu}}
    - {name: cpu, labels: {accelerator: cpu}}
"""


def test_subsets_select_by_labels_and_carry_rule_settings() -> None:
    config = config_from_yaml(SUBSETS, source="subsets.yaml")
    cm = clusters(
        config,
        [
            *workers(2, accelerator="gpu"),
            StaticInstance("inference", "c", "10.0.1.1:8001", {"accelerator": "cpu"}),
        ],
    )
    rng = random.Random(0)
    gpu = decide(cm, RequestInfo(INFER, (("x-lane", "gpu"), ("x-keep", "k"))), rng)
    assert gpu.subset == "gpu" and {e.address for e in gpu.candidates} == {
        "10.0.0.0:8001",
        "10.0.0.1:8001",
    }
    assert dict(gpu.metadata) == {"x-keep": "k", "x-routed": "gpu"}
    assert gpu.retries.attempts == 4 and gpu.retries.should_retry(grpc.StatusCode.INTERNAL)
    assert gpu.fault is not None and gpu.fault.abort is not None and gpu.fault.abort.percentage == 5
    assert gpu.mirror is not None and gpu.mirror.subset == "cpu" and gpu.mirror_percentage == 100
    cpu = decide(cm, RequestInfo(INFER), rng)
    assert cpu.subset == "cpu" and [e.address for e in cpu.candidates] == ["10.0.1.1:8001"]
    # ROUND_ROBIN alternates over the gpu subset.
    firsts = [
        decide(cm, RequestInfo(INFER, (("x-lane", "gpu"),)), rng).candidates[0].address
        for _ in range(4)
    ]
    assert firsts[0] != firsts[1] and firsts[0] == firsts[2]


def test_host_without_virtual_service_uses_the_default_route_and_retries() -> None:
    cm = clusters(MeshConfig.build([], version=1, source="none"), workers(2, service="data"))
    decision = decide(cm, RequestInfo("/meshserve.data.v1.Data/ReadBatches"), random.Random(0))
    assert decision.route == "default" and decision.host == "data"
    assert decision.retries.attempts == 2 and decision.hash_key is None
    assert len(decision.candidates) == 2  # LEAST_REQUEST, Istio's default


def test_outlier_ejection_moves_a_key_to_its_successor_and_back() -> None:
    clock = Clock()
    cm = ClusterMap(DEFAULT, EndpointsSnapshot.from_instances(workers(3)), LoadTracker(), clock)
    rng = random.Random(0)
    first = decide(cm, infer("resnet", "3"), rng)
    owner, successor = first.candidates[0], first.candidates[1]
    cluster = cm.cluster("inference")
    assert cluster.outliers is not None
    for _ in range(5):
        cluster.outliers.record(owner.address, grpc.StatusCode.UNAVAILABLE, cluster.healthy)
    ejected = decide(cm, infer("resnet", "3"), rng)
    assert ejected.candidates[0] == successor and owner not in ejected.candidates
    clock.now += 30.0
    assert decide(cm, infer("resnet", "3"), rng).candidates[0] == owner


def test_a_new_cluster_map_keeps_rings_and_ejections_when_members_are_unchanged() -> None:
    clock = Clock()
    tracker = LoadTracker()
    snapshot = EndpointsSnapshot.from_instances(workers(3))
    old = ClusterMap(DEFAULT, snapshot, tracker, clock)
    cluster = old.cluster("inference")
    assert cluster.outliers is not None
    cluster.outliers.record("10.0.0.1:8001", grpc.StatusCode.UNAVAILABLE, cluster.healthy)
    new = ClusterMap(DEFAULT, snapshot, tracker, clock, previous=old)
    same = new.cluster("inference")
    assert same.ring is cluster.ring and same.members.generation == cluster.members.generation
    assert same.outliers is cluster.outliers
    grown = ClusterMap(
        DEFAULT, EndpointsSnapshot.from_instances(workers(4)), tracker, clock, previous=new
    )
    assert grown.cluster("inference").members.generation == cluster.members.generation + 1
    assert grown.cluster("inference").ring is not cluster.ring


def test_endpoint_from_instance_reads_weight_and_health() -> None:
    snapshot = EndpointsSnapshot.from_instances(
        [
            StaticInstance("inference", "a", "h:1", {"meshserve.io/weight": "3"}),
            StaticInstance("inference", "b", "h:2", status="SERVING_STATUS_NOT_SERVING"),
        ]
    )
    a, b = snapshot.endpoints("inference")
    assert a == Endpoint("h:1", "a", (("meshserve.io/weight", "3"),), weight=3, healthy=True)
    assert not b.healthy


def test_explanation_names_the_connection_pool_limits() -> None:
    limited = DEFAULT.merged(
        parse_yaml(
            """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: inference}
spec:
  host: inference
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 4}, http: {maxRetries: 2}}
""",
            "limits.yaml",
        ),
        version=2,
        source="limits",
    )
    text = decide(clusters(limited, workers(2)), infer("m"), random.Random(0), explain=True)
    assert "connectionPool limits of inference: maxConnections=4, maxRetries=2" in (
        text.explanation
    )
    # The shipped config sets one limit; the others, at Istio's default, are not named.
    plain = decide(clusters(DEFAULT, workers(2)), infer("m"), random.Random(0), explain=True)
    assert "connectionPool limits of inference: http2MaxRequests=1024" in plain.explanation
