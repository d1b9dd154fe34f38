"""Which model versions the gateway's ring will send to one endpoint: a joining worker's preload.

A worker that joins a consistent-hash service should load, before it reports SERVING, the
versions whose keys the new ring gives it, so no request of its share waits for a load.
The answer is computed with the gateway's own pieces (:class:`ClusterMap` builds the ring
kind the DestinationRule asks for: Envoy's whole ring, per-endpoint points or Maglev; the
key is the one :func:`mesh.routing.hashkey.hash_key` builds), never with a second ring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import Endpoint, EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.config.snapshot import MeshConfig
from mesh.routing.hashkey import LATEST

Version = tuple[str, int]


def version_keys(fields: Sequence[str], name: str, version: int, newest: bool) -> tuple[str, ...]:
    """The hash keys under which requests for ``name`` ``version`` arrive.

    ``fields`` is the DestinationRule's ``meshserve.io/hash-fields``. A request without a
    version hashes as ``latest`` (see :func:`mesh.routing.hashkey.hash_key`), which the
    worker serves with its newest version, so the newest version owns that key too.
    """
    versions = [str(version), LATEST] if newest and "model_version" in fields else [str(version)]
    keys = []
    for value in versions:
        keys.append("/".join(name if f == "model_name" else value for f in fields))
    return tuple(dict.fromkeys(keys))


@dataclass(frozen=True)
class Ownership:
    """The versions routed to the endpoint, and the keys that made them so."""

    owned: frozenset[Version]
    keys: tuple[str, ...]


def owned_versions(
    config: MeshConfig,
    host: str,
    peers: Iterable[Endpoint],
    own: Endpoint,
    versions: Mapping[str, Sequence[int]],
) -> Ownership | None:
    """The versions of ``versions`` (name → servable versions) whose keys ``own`` receives.

    ``peers``: the other SERVING endpoints of ``host``; ``own`` joins them as healthy (it
    is about to report SERVING). A key is ``own``'s when ``own`` is among the first
    ``hot-key-replicas`` endpoints of the key's order on the ring (a hot key spreads over
    them, so each must hold its weights). With subsets, every subset ``own`` belongs to
    counts. None when the ring tells nothing of versions: no consistent hash for the host,
    a hash by source IP, or a key without the model name (a header alone) — the caller
    then loads every servable version, as before.
    """
    own = Endpoint(own.address, own.instance_id, own.labels, own.weight, healthy=True)
    members = [p for p in peers if p.address != own.address] + [own]
    clusters = ClusterMap(config, EndpointsSnapshot({host: members}), LoadTracker(), lambda: 0.0)
    rule = config.destination_rule(host)
    subsets = [""]
    if rule is not None:
        subsets += [s.name for s in rule.subsets if own.matches(s.labels)]
    owned: set[Version] = set()
    keys: list[str] = []
    hashed = False
    for subset in subsets:
        cluster = clusters.cluster(host, subset)
        ch = cluster.policy.load_balancer.consistent_hash
        fields = cluster.extensions.hash_fields
        if cluster.ring is None or ch is None or ch.use_source_ip or "model_name" not in fields:
            continue
        hashed = True
        replicas = max(1, cluster.ring_policy.hot_key_replicas)
        successors = cluster.ring_policy.successors
        for name, numbers in versions.items():
            newest = max(numbers, default=None)
            for number in numbers:
                for key in version_keys(fields, name, number, number == newest):
                    order = cluster.ring.order(key, successors=successors)[:replicas]
                    if any(e.address == own.address for e in order):
                        owned.add((name, number))
                        keys.append(key)
    if not hashed:
        return None
    return Ownership(frozenset(owned), tuple(dict.fromkeys(keys)))
