"""Rule matching (first match wins), weighted picks and header edits, as tables."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.config.snapshot import config_from_yaml
from mesh.config.virtual_service import (
    Destination,
    HeaderOperations,
    RouteDestination,
    VirtualService,
)
from mesh.routing import headers as md
from mesh.routing.match import find_rule, find_rule_memo
from mesh.routing.services import host_for_call, host_for_method
from mesh.routing.weights import percent_hit, pick_destination

INFER = "/inference.GRPCInferenceService/ModelInfer"
READY = "/inference.GRPCInferenceService/ModelReady"
TRAIN = "/meshserve.training.v1.Training/StartJob"

RULES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - name: exact-infer-v2
      match:
        - uri: {exact: /inference.GRPCInferenceService/ModelInfer}
          headers: {x-model-version: {exact: "2"}}
      route: [{destination: {host: inference}}]
    - name: tenant-prefix
      match:
        - headers: {x-tenant: {prefix: "team-"}}
          withoutHeaders: {x-debug: {}}
      route: [{destination: {host: inference}}]
    - name: regex-or-presence
      match:
        - uri: {regex: "/inference\\\\.GRPCInferenceService/Model(Ready|Metadata)"}
        - headers: {x-canary: {}}
      route: [{destination: {host: inference}}]
    - name: case-insensitive
      match:
        - uri: {prefix: /INFERENCE.grpcinferenceservice/server}
          ignoreUriCase: true
      route: [{destination: {host: inference}}]
    - name: header-regex
      match:
        - headers: {x-user: {regex: "[a-z]+-[0-9]+"}}
      route: [{destination: {host: inference}}]
    - name: catch-all
      route: [{destination: {host: inference}}]
"""

VS = config_from_yaml(RULES, source="rules.yaml").virtual_services["inference"][0]


@pytest.mark.parametrize(
    ("method", "headers", "rule"),
    [
        (INFER, {"x-model-version": "2"}, "exact-infer-v2"),
        (INFER, {"x-model-version": "3"}, "catch-all"),
        (INFER + "X", {"x-model-version": "2"}, "catch-all"),  # exact means exact
        (INFER, {"x-tenant": "team-a"}, "tenant-prefix"),
        (INFER, {"x-tenant": "team-a", "x-debug": "1"}, "catch-all"),  # withoutHeaders
        (INFER, {"x-tenant": "other"}, "catch-all"),
        (READY, {}, "regex-or-presence"),
        ("/inference.GRPCInferenceService/ModelMetadata", {}, "regex-or-presence"),
        ("/inference.GRPCInferenceService/ModelReadyX", {}, "catch-all"),  # regex is anchored
        (INFER, {"x-canary": ""}, "regex-or-presence"),  # presence, even empty
        ("/inference.GRPCInferenceService/ServerLive", {}, "case-insensitive"),
        (INFER, {"x-user": "ann-42"}, "header-regex"),
        (INFER, {"x-user": "ann-42!"}, "catch-all"),
        # First match wins: both the v2 rule and the tenant rule match.
        (INFER, {"x-model-version": "2", "x-tenant": "team-a"}, "exact-infer-v2"),
    ],
)
def test_first_matching_rule_wins(method: str, headers: dict[str, str], rule: str) -> None:
    found = find_rule(VS, method, headers)
    assert found is not None
    assert found[0].name == rule


MODEL_RULES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: inference}
spec:
  hosts: [inference]
  http:
    - name: demo-infer
      match:
        - uri: {prefix: /inference.GRPCInferenceService/ModelInfer}
          x-meshserve: {model: {exact: demo}}
      route: [{destination: {host: inference}}]
    - name: resnets
      match:
        - x-meshserve: {model: {regex: "resnet-[0-9]+"}}
          headers: {x-tenant: {prefix: team-}}
      route: [{destination: {host: inference}}]
    - name: catch-all
      route: [{destination: {host: inference}}]
"""
MODEL_VS = config_from_yaml(MODEL_RULES, source="rules.yaml").virtual_services["inference"][0]


@pytest.mark.parametrize(
    ("method", "headers", "model", "rule"),
    [
        (INFER, {}, "demo", "demo-infer"),
        (INFER, {}, "demo2", "catch-all"),  # exact means exact
        (INFER, {}, "", "catch-all"),  # a request naming no model
        (INFER, {}, None, "catch-all"),  # or whose model could not be read
        (READY, {}, "demo", "catch-all"),  # the uri condition still holds (AND)
        (READY, {"x-tenant": "team-a"}, "resnet-50", "resnets"),
        (READY, {"x-tenant": "team-a"}, "resnet-50x", "catch-all"),  # regex is anchored
        (READY, {}, "resnet-50", "catch-all"),
    ],
)
def test_model_match_is_anded_with_the_other_conditions(
    method: str, headers: dict[str, str], model: str | None, rule: str
) -> None:
    found = find_rule(MODEL_VS, method, headers, model)
    assert found is not None
    assert found[0].name == rule


def test_no_rule_matches_without_catch_all() -> None:
    vs = VirtualService(VS.metadata, VS.hosts, VS.http[:1])
    assert find_rule(vs, READY, {}) is None


def test_the_memo_answers_as_find_rule_for_every_request_and_config() -> None:
    table = [
        (INFER, {"x-model-version": "2"}, None),
        (INFER, {"x-model-version": "3", "x-request-id": "a"}, None),
        (INFER, {"x-model-version": "3", "x-request-id": "b"}, None),
        (INFER, {"x-tenant": "team-a", "x-debug": "1"}, None),
        (INFER, {"x-tenant": "team-a"}, None),
        (READY, {"x-tenant": "team-a"}, "resnet-50"),
        (READY, {"x-tenant": "team-a"}, "resnet-50x"),
        (INFER, {}, "demo"),
        (INFER, {"x-user": "ann-42"}, None),
        (INFER, {"x-user": "ann-42!"}, None),
    ]
    cut = VirtualService(VS.metadata, VS.hosts, VS.http[:1])
    for _ in range(2):  # the second pass answers from the memo
        for vs in (VS, MODEL_VS, cut):
            for method, headers, model in table:
                assert find_rule_memo(vs, method, headers, model) == find_rule(
                    vs, method, headers, model
                ), (vs.http[0].name, method, headers, model)


def route(*weights: int) -> tuple[RouteDestination, ...]:
    return tuple(
        RouteDestination(Destination("inference", f"s{i}"), w) for i, w in enumerate(weights)
    )


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((100,), [1.0]),
        ((90, 10), [0.9, 0.1]),
        ((50, 0, 50), [0.5, 0.0, 0.5]),
        ((1, 99), [0.01, 0.99]),
        ((0,), [1.0]),
    ],
)
def test_weighted_pick_follows_weights(weights: tuple[int, ...], expected: list[float]) -> None:
    rng = random.Random(7)
    counts = Counter(
        pick_destination(route(*weights), rng).destination.subset for _ in range(20000)
    )
    for i, share in enumerate(expected):
        assert counts[f"s{i}"] / 20000 == pytest.approx(share, abs=0.01)


def test_weighted_pick_is_deterministic_under_a_seeded_rng() -> None:
    picks = [
        [pick_destination(route(30, 70), random.Random(s)).destination.subset for s in range(50)]
        for _ in range(2)
    ]
    assert picks[0] == picks[1]


@pytest.mark.parametrize(
    ("percentage", "share"), [(0.0, 0.0), (100.0, 1.0), (12.5, 0.125), (0.5, 0.005)]
)
def test_percentages(percentage: float, share: float) -> None:
    rng = random.Random(3)
    hits = sum(percent_hit(percentage, rng) for _ in range(40000))
    assert hits / 40000 == pytest.approx(share, abs=0.004)


@pytest.mark.parametrize(
    ("ops", "before", "after"),
    [
        (
            HeaderOperations(set=(("x-a", "1"),)),
            (("x-a", "0"), ("x-b", "2")),
            (("x-b", "2"), ("x-a", "1")),
        ),
        (HeaderOperations(add=(("x-a", "1"),)), (("x-a", "0"),), (("x-a", "0"), ("x-a", "1"))),
        (
            HeaderOperations(remove=("x-a",)),
            (("x-a", "0"), ("x-a", "1"), ("x-b", "2")),
            (("x-b", "2"),),
        ),
        # remove, then set, then add: a header removed and set ends up set.
        (
            HeaderOperations(set=(("x-v", "2"),), add=(("x-t", "t"),), remove=("x-v", "x-old")),
            (("x-v", "1"), ("x-old", "o")),
            (("x-v", "2"), ("x-t", "t")),
        ),
        (HeaderOperations(), (("x-a", "0"),), (("x-a", "0"),)),
    ],
)
def test_header_edits(ops: HeaderOperations, before: md.Metadata, after: md.Metadata) -> None:
    assert md.apply(ops, before) == after


def test_metadata_helpers() -> None:
    assert md.as_dict((("a", "1"), ("a", "2"), ("b", "3"))) == {"a": "1,2", "b": "3"}
    assert md.normalise((("X-A", "1"), ("x-bin", b"\x00"))) == (("x-a", "1"),)


@pytest.mark.parametrize(
    ("method", "authority", "host"),
    [
        (INFER, "gateway:8080", "inference"),
        (TRAIN, "", "training"),
        ("/meshserve.data.v1.Data/ReadBatches", "127.0.0.1:9", "data"),
        ("/grpc.health.v1.Health/Check", "", None),
        ("/other.Service/Call", "training.meshserve.svc.cluster.local:80", "training"),
        ("/other.Service/Call", "unknown-host", None),
        ("not-a-path", "", None),
    ],
)
def test_host_for_call(method: str, authority: str, host: str | None) -> None:
    assert host_for_call(method, authority, {"inference", "training", "data"}) == host


def test_host_for_method_needs_a_package() -> None:
    assert host_for_method("/Service/Method") is None
