"""The versions a joining worker owns on the gateway's ring (pure: no sockets)."""

from __future__ import annotations

import random

import pytest

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import Endpoint, EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.config.snapshot import MeshConfig, config_from_yaml
from mesh.routing.ownership import owned_versions, version_keys

HOST = "inference"
#: Two models, many versions: enough keys that every worker owns some.
VERSIONS = {"resnet": list(range(1, 21)), "bert": list(range(1, 21))}


def rule(
    *,
    lb: str = "consistentHash: {httpHeaderName: x-model-version, ringHash: {minimumRingSize: 256}}",
    fields: str | None = "model_name,model_version",
    points: str = "whole-ring",
    replicas: int = 1,
    subsets: str = "",
) -> MeshConfig:
    annotations = [f'meshserve.io/hot-key-replicas: "{replicas}"']
    if fields is not None:
        annotations.append(f'meshserve.io/hash-fields: "{fields}"')
    if "maglev" not in lb:
        annotations.append(f"meshserve.io/ring-points: {points}")
    text = f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: inference
  annotations:
{chr(10).join("    " + a for a in annotations)}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer:
      {lb}
{subsets}
"""
    return config_from_yaml(text, source="rule.yaml")


def workers(n: int, labels: tuple[tuple[str, str], ...] = ()) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8001", f"w{i}", labels) for i in range(1, n + 1)]


def gateway_owners(config: MeshConfig, members: list[Endpoint], key: str, n: int) -> set[str]:
    """Where the gateway sends ``key``: its first ``n`` candidates with nothing in flight."""
    clusters = ClusterMap(config, EndpointsSnapshot({HOST: members}), LoadTracker(), lambda: 0.0)
    pick = clusters.cluster(HOST).pick(key, random.Random(0))
    return {e.address for e in pick.candidates[:n]}


@pytest.mark.parametrize(
    ("name", "config", "before", "replicas"),
    [
        ("1->2 whole ring", rule(), 1, 1),
        ("2->3 whole ring", rule(), 2, 1),
        ("1->2 per endpoint", rule(points="per-endpoint"), 1, 1),
        ("2->3 per endpoint", rule(points="per-endpoint"), 2, 1),
        (
            "2->3 maglev",
            rule(lb="consistentHash: {httpHeaderName: h, maglev: {tableSize: 65537}}"),
            2,
            1,
        ),
        ("2->3 hot-key replicas 2", rule(points="per-endpoint", replicas=2), 2, 2),
        ("1->2 hot-key replicas 2", rule(replicas=2), 1, 2),
    ],
)
def test_the_joiner_owns_what_the_gateway_will_send_it(
    name: str, config: MeshConfig, before: int, replicas: int
) -> None:
    members = workers(before + 1)
    joiner = members[-1]
    found = owned_versions(config, HOST, members[:-1], joiner, VERSIONS)
    assert found is not None, name
    expected: set[tuple[str, int]] = set()
    first: set[tuple[str, int]] = set()
    for model, numbers in VERSIONS.items():
        for number in numbers:
            for key in version_keys(("model_name", "model_version"), model, number, number == 20):
                if joiner.address in gateway_owners(config, members, key, replicas):
                    expected.add((model, number))
    assert found.owned == expected
    total = sum(len(v) for v in VERSIONS.values())
    # It owns a share: something, and with one owner per key not everything.
    assert found.owned
    if replicas == 1:
        assert len(found.owned) < total
    else:
        # A hot key spreads: it owns at least what it would as the only owner.
        assert first < found.owned


def test_with_one_owner_per_key_the_workers_split_the_versions() -> None:
    config = rule(points="per-endpoint")
    members = workers(3)
    shares = []
    for own in members:
        found = owned_versions(config, HOST, members, own, VERSIONS)
        assert found is not None
        shares.append(found.owned)
    # Each version has exactly one owner, except the newest: ``latest`` may sit elsewhere.
    everything = {(m, v) for m, vs in VERSIONS.items() for v in vs}
    assert set().union(*shares) == everything
    singles = everything - {("resnet", 20), ("bert", 20)}
    for version in singles:
        assert sum(version in share for share in shares) == 1


def test_per_endpoint_points_move_keys_only_to_the_joiner() -> None:
    config = rule(points="per-endpoint")
    two, three = workers(2), workers(3)
    for own in two:
        before = owned_versions(config, HOST, two, own, VERSIONS)
        after = owned_versions(config, HOST, three, own, VERSIONS)
        assert before is not None and after is not None
        assert after.owned <= before.owned


def test_the_newest_version_owns_the_latest_key() -> None:
    assert version_keys(("model_name", "model_version"), "m", 3, True) == ("m/3", "m/latest")
    assert version_keys(("model_name", "model_version"), "m", 2, False) == ("m/2",)
    # Hashed by name alone: every version of a model goes where the name does.
    assert version_keys(("model_name",), "m", 2, True) == ("m",)
    config = rule(fields="model_name")
    members = workers(2)
    found = owned_versions(config, HOST, members[:1], members[1], {"m": [1, 2, 3]})
    assert found is not None
    assert found.owned in (frozenset(), frozenset({("m", 1), ("m", 2), ("m", 3)}))
    assert (members[1].address in gateway_owners(config, members, "m", 1)) == bool(found.owned)


@pytest.mark.parametrize(
    ("why", "config"),
    [
        ("no rule at all", config_from_yaml("", source="empty.yaml")),
        ("a simple balancer", rule(lb="simple: ROUND_ROBIN", fields=None)),
        ("a header alone: the key is not a version", rule(fields=None)),
        ("source IP", rule(lb="consistentHash: {useSourceIp: true}", fields=None)),
    ],
)
def test_without_owner_info_the_answer_is_none(why: str, config: MeshConfig) -> None:
    members = workers(2)
    assert owned_versions(config, HOST, members[:1], members[1], VERSIONS) is None, why


def test_a_subset_member_owns_keys_of_its_subset_ring() -> None:
    subsets = """  subsets:
    - name: v1
      labels: {track: stable}
    - name: v2
      labels: {track: canary}"""
    config = rule(subsets=subsets)
    stable = [Endpoint(f"10.0.1.{i}:8001", f"s{i}", (("track", "stable"),)) for i in (1, 2)]
    canary = Endpoint("10.0.2.1:8001", "c1", (("track", "canary"),))
    # Alone in its subset: every key of the canary subset is its own.
    found = owned_versions(config, HOST, stable, canary, VERSIONS)
    assert found is not None
    assert found.owned == {(m, v) for m, vs in VERSIONS.items() for v in vs}
