"""localityLbSetting through the routing core: failover by priority, distribute by weight."""

from __future__ import annotations

import random
from collections import Counter

import grpc
import pytest

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import Endpoint, EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.balance.locality import (
    REGION_LABEL,
    SUBZONE_LABEL,
    ZONE_LABEL,
    Locality,
    failover_levels,
    locality_matches,
    priority_loads,
)
from mesh.config.fields import ConfigError
from mesh.config.snapshot import config_from_yaml
from mesh.routing.discovery import StaticInstance

WEST1 = Locality("us-west", "zone1")


def instance(name: str, where: str) -> StaticInstance:
    region, zone = where.split("/")
    labels = {REGION_LABEL: region, ZONE_LABEL: zone}
    return StaticInstance("inference", name, f"{name}:8001", labels)


INSTANCES = [
    instance("a", "us-west/zone1"),
    instance("b", "us-west/zone2"),
    instance("c", "us-east/zone1"),
    instance("d", "eu-west/zone1"),
]
OUTLIERS = "    outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}\n"


def dr(policy: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: inference}\n"
        f"spec:\n  host: inference\n  trafficPolicy:\n{policy}"
    )


def clusters(policy: str, locality: Locality | None = WEST1) -> ClusterMap:
    return ClusterMap(
        config_from_yaml(dr(policy), source="dr.yaml"),
        EndpointsSnapshot.from_instances(INSTANCES),
        LoadTracker(),
        lambda: 0.0,
        locality=locality,
    )


def first_picks(found: ClusterMap, n: int = 400) -> Counter[str]:
    rng = random.Random(7)
    cluster = found.cluster("inference")
    return Counter(cluster.pick(None, rng).candidates[0].address[0] for _ in range(n))


FAILOVER = (
    "    loadBalancer:\n      simple: ROUND_ROBIN\n"
    "      localityLbSetting:\n        failover: [{from: us-west, to: eu-west}]\n" + OUTLIERS
)


def test_failover_keeps_calls_local_and_orders_the_rest_by_priority() -> None:
    found = clusters(FAILOVER)
    cluster = found.cluster("inference")
    assert [tuple(e.address[0] for e in level) for level in cluster.levels] == [
        ("a",),  # same zone
        ("b",),  # same region
        ("d",),  # the failover region
        ("c",),  # every other region
    ]
    assert first_picks(found) == {"a": 400}
    order = cluster.pick(None, random.Random(1)).candidates
    assert [e.address[0] for e in order] == ["a", "b", "d", "c"]  # retries fall back in order


def test_an_ejected_local_endpoint_fails_over_to_the_next_priority() -> None:
    found = clusters(FAILOVER)
    cluster = found.cluster("inference")
    assert cluster.outliers is not None
    cluster.outliers.record("a:8001", grpc.StatusCode.UNAVAILABLE, cluster.healthy)
    assert first_picks(found) == {"b": 400}


def test_without_outlier_detection_or_a_known_locality_failover_does_nothing() -> None:
    """Istio: failover needs outlier detection; and a proxy with no locality has none."""
    no_outliers = FAILOVER.replace(OUTLIERS, "")
    for found in (clusters(no_outliers), clusters(FAILOVER, locality=None)):
        assert found.cluster("inference").levels == ()
        assert set(first_picks(found)) == {"a", "b", "c", "d"}


def test_the_mesh_default_prioritises_by_locality_whenever_outliers_are_detected() -> None:
    assert first_picks(clusters("    loadBalancer: {simple: RANDOM}\n" + OUTLIERS)) == {"a": 400}
    disabled = "    loadBalancer: {simple: RANDOM, localityLbSetting: {enabled: false}}\n"
    assert len(first_picks(clusters(disabled + OUTLIERS))) == 4


def test_distribute_splits_by_weight_and_starves_unlisted_localities() -> None:
    policy = (
        "    loadBalancer:\n      simple: ROUND_ROBIN\n      localityLbSetting:\n"
        "        distribute:\n          - from: us-west/zone1/*\n"
        "            to: {'us-west/zone1/*': 80, 'us-west/zone2/*': 20}\n"
    )
    picks = first_picks(clusters(policy), 2000)
    assert set(picks) == {"a", "b"}
    assert 0.75 < picks["a"] / 2000 < 0.85
    # From another locality the entry does not apply: every endpoint takes calls.
    assert len(first_picks(clusters(policy, Locality("eu-west", "zone1")))) == 4


def test_hash_keys_keep_their_priority() -> None:
    policy = (
        "    loadBalancer:\n      consistentHash: {httpHeaderName: x-model-version}\n" + OUTLIERS
    )
    cluster = clusters(policy).cluster("inference")
    owners = {cluster.pick(f"v{i}", random.Random(i)).candidates[0].address for i in range(50)}
    assert owners == {"a:8001"}


def test_priority_loads_spill_past_envoys_overprovisioning() -> None:
    local = [Endpoint(f"10.0.0.{i}:1") for i in range(10)]
    remote = [Endpoint(f"10.1.0.{i}:1") for i in range(10)]
    assert priority_loads([local, remote], ()) == [1.0, 0.0]
    # 8 of 10 healthy: 1.4 x 80 % covers everything.
    assert priority_loads([local, remote], {e.address for e in local[:2]}) == [1.0, 0.0]
    # 5 of 10 healthy: 70 % stays, 30 % spills.
    loads = priority_loads([local, remote], {e.address for e in local[:5]})
    assert loads == pytest.approx([0.7, 0.3])


def test_locality_patterns_and_levels() -> None:
    here = Locality("us-west", "zone1", "sub1")
    assert locality_matches("*", here) and locality_matches("us-west/*", here)
    assert locality_matches("us-west/zone1/sub1", here)
    assert not locality_matches("us-west/zone2/*", here)
    sub = Endpoint(
        "s:1", labels=((REGION_LABEL, "us-west"), (SUBZONE_LABEL, "sub1"), (ZONE_LABEL, "zone1"))
    )
    zone = Endpoint("z:1", labels=((REGION_LABEL, "us-west"), (ZONE_LABEL, "zone1")))
    assert failover_levels(here, [zone, sub], ()) == ((sub,), (zone,))


@pytest.mark.parametrize(
    ("setting", "path", "says"),
    [
        (
            "{distribute: [{from: '*', to: {'*': 100}}], failover: [{from: a, to: b}]}",
            "localityLbSetting",
            "set distribute or failover, not both",
        ),
        ("{distribute: [{from: '*', to: {'us/*': 60}}]}", "distribute[0].to", "sum to 100"),
        ("{failover: [{from: us-west, to: us-west}]}", "failover[0].to", "its own region"),
        ("{failover: [{from: us-west/zone1, to: eu}]}", "failover[0].from", "must be a region"),
        ("{distribute: [{from: 'us*', to: {'*': 100}}]}", "distribute[0].from", "whole part"),
        (
            "{failoverPriority: [topology.kubernetes.io/region]}",
            "failoverPriority",
            "does not support",
        ),
    ],
)
def test_refusals_name_the_field(setting: str, path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_yaml(
            dr(f"    loadBalancer: {{simple: RANDOM, localityLbSetting: {setting}}}\n"),
            source="dr.yaml",
        )
    assert path in str(caught.value) and says in str(caught.value), str(caught.value)
