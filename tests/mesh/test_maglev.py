"""Envoy's Maglev table: balance, stickiness, disruption, and the DestinationRule that picks it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import Endpoint, EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.balance.maglev import DEFAULT_TABLE_SIZE, MaglevTable, build_table, is_prime
from mesh.balance.ring import RingPolicy, choose
from mesh.config.fields import ConfigError
from mesh.config.snapshot import config_from_yaml
from mesh.routing.decision import RequestInfo, decide
from mesh.routing.discovery import StaticInstance

INFER = "/inference.GRPCInferenceService/ModelInfer"
SMALL = 251  # a prime: tables fast enough for property tests


def endpoints(n: int, weight: int = 1) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8001", weight=weight) for i in range(n)]


def test_the_table_is_full_and_shares_are_even() -> None:
    table = MaglevTable(endpoints(7))
    assert sum(table.points().values()) == DEFAULT_TABLE_SIZE
    # Maglev's promise: each endpoint owns its share of slots to within one round.
    for share in table.shares().values():
        assert abs(share * 7 - 1) < 0.001


def test_weights_set_the_shares() -> None:
    weighted = [Endpoint("a:1", weight=1), Endpoint("b:1", weight=2), Endpoint("c:1", weight=3)]
    shares = MaglevTable(weighted).shares()
    assert shares["a:1"] == pytest.approx(1 / 6, abs=0.002)
    assert shares["b:1"] == pytest.approx(2 / 6, abs=0.002)
    assert shares["c:1"] == pytest.approx(3 / 6, abs=0.002)


def test_lookups_are_stable_across_builds_and_orders() -> None:
    eps = endpoints(5)
    a, b = MaglevTable(eps), MaglevTable(list(reversed(eps)))
    keys = [f"model-{i}" for i in range(500)]
    assert [a.primary(k) for k in keys] == [b.primary(k) for k in keys]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), removed=st.integers(0, 11))
def test_removing_an_endpoint_moves_its_keys_and_few_others(n: int, removed: int) -> None:
    removed %= n
    eps = endpoints(n)
    before = build_table(eps, SMALL)
    gone = eps[removed]
    rest = [e for e in eps if e != gone]
    after = build_table(rest, SMALL)
    index_after = {e.address: i for i, e in enumerate(rest)}
    moved_others = 0
    for slot in range(SMALL):
        owner = eps[before[slot]]
        if owner == gone:
            continue  # its slots must go elsewhere
        if index_after[owner.address] != after[slot]:
            moved_others += 1
    # Minimal disruption, not none: the paper measures a few percent of the table.
    assert moved_others <= SMALL * 0.15, moved_others


def test_retries_follow_envoys_mutated_hash_or_table_successors() -> None:
    table = MaglevTable(endpoints(4))
    for successors in (False, True):
        order = table.order("resnet/3", successors=successors)
        assert order[0] == table.primary("resnet/3")
        assert len(set(order)) == len(order)
    assert len(table.order("resnet/3", successors=True)) == 4


def test_choose_applies_bounded_loads_on_a_maglev_table() -> None:
    table = MaglevTable(endpoints(3), table_size=SMALL)
    tracker = LoadTracker()
    owner = table.primary("hot")
    assert owner is not None
    for _ in range(10):
        tracker.start(owner.address, "other")
    choice = choose(table, "hot", tracker, RingPolicy(bounded_load=1.25, cold_spill=1.0))
    assert choice.candidates[0] != owner


def test_table_sizes_must_be_prime() -> None:
    assert is_prime(65537) and is_prime(5000011) and not is_prime(65536)
    with pytest.raises(ValueError, match="prime"):
        MaglevTable(endpoints(2), table_size=1000)


def dr(consistent_hash: str, annotations: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata:\n  name: inference\n{annotations}spec:\n  host: inference\n"
        f"  trafficPolicy: {{loadBalancer: {{consistentHash: {consistent_hash}}}}}\n"
    )


def test_a_destination_rule_picks_maglev_through_the_routing_core() -> None:
    config = config_from_yaml(
        dr("{httpHeaderName: x-model-version, maglev: {tableSize: 65537}}"), source="dr.yaml"
    )
    instances = [StaticInstance("inference", f"w{i}", f"10.0.0.{i}:8001") for i in range(4)]
    clusters = ClusterMap(
        config, EndpointsSnapshot.from_instances(instances), LoadTracker(), lambda: 0.0
    )
    cluster = clusters.cluster("inference")
    assert isinstance(cluster.ring, MaglevTable) and cluster.ring.vnodes == 65537
    picks = {
        decide(
            clusters,
            RequestInfo(INFER, (("x-model-version", "v7"),)),
            random.Random(seed),
        ).candidates[0]
        for seed in range(10)
    }
    assert picks == {cluster.ring.primary("v7")}


@pytest.mark.parametrize(
    ("consistent_hash", "says"),
    [
        ("{httpHeaderName: x, maglev: {tableSize: 65536}}", "must be a prime number"),
        ("{httpHeaderName: x, maglev: {}, ringHash: {minimumRingSize: 8}}", "not both"),
        ("{httpHeaderName: x, maglev: {tableSize: 5000012}}", "must be an integer"),
    ],
)
def test_maglev_refusals_name_the_field(consistent_hash: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_yaml(dr(consistent_hash), source="dr.yaml")
    assert "consistentHash.maglev" in str(caught.value) and says in str(caught.value)


def test_an_empty_maglev_block_takes_envoys_default_size() -> None:
    config = config_from_yaml(dr("{httpHeaderName: x, maglev: {}}"), source="dr.yaml")
    rule = config.destination_rule("inference")
    assert rule is not None
    ch = rule.traffic_policy.load_balancer.consistent_hash
    assert ch is not None and ch.maglev_table_size == DEFAULT_TABLE_SIZE


def test_per_endpoint_ring_points_are_refused_with_maglev() -> None:
    annotations = "  annotations: {meshserve.io/ring-points: per-endpoint}\n"
    with pytest.raises(ConfigError, match="a Maglev table has no points per endpoint"):
        config_from_yaml(dr("{httpHeaderName: x, maglev: {}}", annotations), source="dr.yaml")
