"""Per host/subset upstream state: endpoints, ring, balancer and outlier detector."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

from mesh.balance.endpoints import Endpoint, EndpointSet, EndpointsSnapshot, select
from mesh.balance.load import LoadTracker
from mesh.balance.locality import (
    Locality,
    choose_group,
    distribution,
    draw_for,
    failover_levels,
    pick_index,
    priority_loads,
)
from mesh.balance.maglev import MaglevTable
from mesh.balance.outlier import OutlierDetector
from mesh.balance.ring import HashRing, KeyTable, RingPolicy, choose
from mesh.balance.simple import RoundRobin, least_request_order, random_order
from mesh.config.client_tls import DISABLE, ISTIO_MUTUAL, ClientTls
from mesh.config.destination_rule import Extensions, OutlierDetection, TrafficPolicy
from mesh.config.snapshot import MeshConfig
from mesh.config.views import MESH_VIEW, View
from mesh.routing.services import host_for_call


@dataclass(frozen=True)
class Pick:
    """Endpoints in the order to try them, and the reasons for the order."""

    candidates: tuple[Endpoint, ...]
    reasons: tuple[str, ...]
    #: Addresses skipped because outlier detection ejected them.
    ejected: frozenset[str] = frozenset()


class Cluster:
    """One host/subset: its healthy endpoints, a ring or simple balancer, ejections.

    Rebuilt (not mutated) when membership or policy changes; the outlier detector and
    round-robin position are handed over so a config reload forgets nothing.
    """

    def __init__(
        self,
        members: EndpointSet,
        policy: TrafficPolicy,
        extensions: Extensions,
        tracker: LoadTracker,
        clock: Callable[[], float],
        previous: Cluster | None = None,
        tls: ClientTls = ISTIO_MUTUAL,
        locality: Locality | None = None,
    ) -> None:
        self.members = members
        self.policy = policy
        #: How the relay secures connections to these endpoints (``trafficPolicy.tls``,
        #: or the auto-mTLS default for the host).
        self.tls = policy.tls or tls
        self.extensions = extensions
        self.tracker = tracker
        healthy = members.healthy
        self._addresses = tuple(e.address for e in healthy)
        lb = policy.load_balancer
        reuse = previous is not None and previous.members.endpoints == members.endpoints
        self.ring: KeyTable | None = None
        #: Per locality priority or group (Envoy builds a ring per priority), by members.
        self._group_rings: dict[tuple[str, ...], KeyTable] = {}
        if lb.consistent_hash is not None:
            maglev = lb.consistent_hash.maglev_table_size
            size = maglev or lb.consistent_hash.minimum_ring_size
            per_endpoint = extensions.per_endpoint_ring and maglev is None
            algorithm = "ring" if maglev is None else "maglev"
            if (
                reuse
                and previous is not None
                and previous.ring is not None
                and previous.ring.algorithm == algorithm
                and previous.ring.vnodes == size
                and previous.ring.per_endpoint == per_endpoint
            ):
                self.ring = previous.ring
            elif maglev is not None:
                self.ring = MaglevTable(healthy, table_size=maglev, generation=members.generation)
            else:
                self.ring = HashRing(
                    healthy,
                    vnodes=size,
                    generation=members.generation,
                    per_endpoint=per_endpoint,
                )
        self._round_robin: RoundRobin = (
            previous._round_robin if reuse and previous is not None else RoundRobin(healthy)
        )
        self.outliers: OutlierDetector | None = None
        if policy.outlier_detection is not None:
            self.outliers = _carry_outliers(previous, policy.outlier_detection, clock)
            self.outliers.forget(self._addresses)
        #: Locality balancing (``localityLbSetting``): endpoints by priority (failover), or
        #: weighted locality groups (distribute); both empty: every endpoint is alike.
        self.levels: tuple[tuple[Endpoint, ...], ...] = ()
        self.groups: tuple[tuple[tuple[Endpoint, ...], int], ...] = ()
        self.distributed = False
        setting = lb.locality
        if locality is not None and setting.enabled and healthy:
            if setting.distribute:
                found = distribution(locality, healthy, setting.distribute)
                if found is not None:
                    self.groups, self.distributed = found, True
            elif policy.outlier_detection is not None:
                # Failover needs outlier detection (Istio's rule: nothing else would ever
                # find the local endpoints unhealthy).
                levels = failover_levels(locality, healthy, setting.failover)
                if len(levels) > 1:
                    self.levels = levels
        self.ring_policy = RingPolicy(
            bounded_load=extensions.bounded_load,
            hot_key_replicas=extensions.hot_key_replicas,
            hot_key_threshold=extensions.hot_key_threshold,
            cold_spill=extensions.cold_spill,
            successors=extensions.successor_retries,
        )

    @property
    def healthy(self) -> tuple[str, ...]:
        return self._addresses

    def excluded(self) -> frozenset[str]:
        return self.outliers.excluded(self._addresses) if self.outliers else frozenset()

    def pick(self, key: str | None, rng: random.Random, *, explain: bool = False) -> Pick:
        excluded = self.excluded()
        if not (self.levels or self.distributed):
            return self._pick(key, rng, excluded, explain=explain)
        # Locality first: a priority (failover) or a locality (distribute), drawn by the
        # hash key when there is one; the balancer then picks within it, and the other
        # priorities or distributed localities follow as retry fallbacks.
        draw = draw_for(key, rng)
        ordered: list[tuple[Endpoint, ...]]
        if self.levels:
            index = pick_index(priority_loads(self.levels, excluded), draw)
            ordered = [self.levels[index], *self.levels[:index], *self.levels[index + 1 :]]
            why = f"locality failover: priority {index} of {len(self.levels)}"
        else:
            found = choose_group(self.groups, excluded, draw)
            if found is None:  # nothing healthy where traffic may go: Envoy's panic mode
                found = choose_group(self.groups, (), draw)
            if found is None:
                return Pick((), ("locality distribute: no endpoint in a listed locality",))
            groups = [g for g, _ in self.groups]
            ordered = [groups[found], *groups[:found], *groups[found + 1 :]]
            why = f"locality distribute: locality group {found} of {len(groups)}"
        chosen = frozenset(e.address for e in ordered[0])
        outside = frozenset(a for a in self._addresses if a not in chosen)
        ring = self._group_ring(ordered[0]) if self.ring is not None else None
        pick = self._pick(key, rng, excluded | outside, explain=explain, ring=ring)
        if not pick.candidates:
            pick = self._pick(key, rng, excluded, explain=explain)
        fallback = tuple(
            e
            for group in ordered[1:]
            for e in group
            if e.address not in excluded and e not in pick.candidates
        )
        reasons = (why, *pick.reasons) if explain else ()
        return Pick(pick.candidates + fallback, reasons, excluded)

    def _group_ring(self, group: tuple[Endpoint, ...]) -> KeyTable:
        """The ring (or Maglev table) of one priority or locality, built on first use."""
        key = tuple(e.address for e in group)
        found = self._group_rings.get(key)
        if found is None:
            assert self.ring is not None
            if isinstance(self.ring, MaglevTable):
                found = MaglevTable(group, table_size=self.ring.vnodes)
            else:
                found = HashRing(
                    group, vnodes=self.ring.vnodes, per_endpoint=self.ring.per_endpoint
                )
            self._group_rings[key] = found
        return found

    def _pick(
        self,
        key: str | None,
        rng: random.Random,
        excluded: frozenset[str],
        *,
        explain: bool,
        ring: KeyTable | None = None,
    ) -> Pick:
        ring = ring or self.ring
        reasons: list[str] = []
        if explain and excluded:
            reasons.append(f"outlier detection ejected {', '.join(sorted(excluded))}")
        if ring is not None and key is not None:
            choice = choose(ring, key, self.tracker, self.ring_policy, excluded, explain=explain)
            return Pick(choice.candidates, (*reasons, *choice.reasons), excluded)
        healthy = self.members.healthy
        simple = self.policy.load_balancer.simple
        if self.ring is not None:
            # consistentHash without a key for this request: spread like LEAST_REQUEST.
            reason = "no hash key in this request: least request of two random endpoints"
            order = least_request_order(healthy, rng, self.tracker, excluded)
        elif simple == "ROUND_ROBIN":
            reason = "ROUND_ROBIN"
            order = self._round_robin.order(excluded)
        elif simple == "RANDOM":
            reason = "RANDOM"
            order = random_order(healthy, rng, excluded)
        else:
            reason = "LEAST_REQUEST: fewer in flight of two random endpoints"
            order = least_request_order(healthy, rng, self.tracker, excluded)
        if explain:
            reasons.append(reason)
        return Pick(tuple(order), tuple(reasons), excluded)


def _carry_outliers(
    previous: Cluster | None, policy: OutlierDetection, clock: Callable[[], float]
) -> OutlierDetector:
    if previous is not None and previous.outliers is not None:
        previous.outliers.policy = policy
        return previous.outliers
    return OutlierDetector(policy, clock)


class ClusterMap:
    """Clusters for every host/subset, built lazily from one config and endpoint snapshot."""

    def __init__(
        self,
        config: MeshConfig,
        snapshot: EndpointsSnapshot,
        tracker: LoadTracker,
        clock: Callable[[], float],
        previous: ClusterMap | None = None,
        locality: Locality | None = None,
        view: View | None = None,
    ) -> None:
        #: The proxy's own locality (None: unknown, so locality balancing is off).
        self.locality: Locality | None = (
            locality if locality is not None or previous is None else previous.locality
        )
        #: Where this proxy routes (sidecars by default); kept across maps like locality.
        self.view: View = view or (previous.view if previous is not None else MESH_VIEW)
        self.config = config
        #: The rules that apply in this view: what every routing decision looks up.
        self.routes = config.routes(self.view)
        #: The registry's endpoints as discovery reported them (what the next map reuses).
        self.snapshot = snapshot
        #: What routing balances over: the registry's endpoints plus ServiceEntries'.
        self.routable = config.routable(snapshot)
        self.tracker = tracker
        self.clock = clock
        # Clusters the previous map built, or inherited unbuilt (clusters are built lazily).
        self._previous: dict[tuple[str, str], Cluster] = (
            {**previous._previous, **previous._clusters} if previous is not None else {}
        )
        self._clusters: dict[tuple[str, str], Cluster] = {}
        self._generations: dict[tuple[str, str], int] = (
            dict(previous._generations) if previous is not None else {}
        )
        #: host_for_call answers for this map's known hosts, by (method, authority).
        self._hosts: dict[tuple[str, str], str | None] = {}

    def host_for(self, method: str, authority: str) -> str | None:
        """:func:`mesh.routing.services.host_for_call` against :attr:`known_hosts`, cached
        for the life of this map (a call's method and authority repeat; parsing them is
        a measurable share of a routing decision)."""
        key = (method, authority)
        try:
            return self._hosts[key]
        except KeyError:
            pass
        if len(self._hosts) >= 4096:
            self._hosts.clear()
        found = self._hosts[key] = host_for_call(method, authority, self.known_hosts)
        return found

    def cluster(self, host: str, subset: str = "") -> Cluster:
        key = (host, subset)
        found = self._clusters.get(key)
        if found is not None:
            return found
        rule = self.config.destination_rule(host)
        entry = self.config.service_entry(host)
        labels: tuple[tuple[str, str], ...] = ()
        policy = TrafficPolicy()
        extensions = Extensions()
        if rule is not None:
            extensions = rule.extensions
            # A ServiceEntry host has a service port, where portLevelSettings apply.
            policy = rule.policy_for(subset or None, entry.port if entry else None)
            found_subset = rule.subset(subset) if subset else None
            if found_subset is not None:
                labels = found_subset.labels
        previous = self._previous.get(key)
        members = select(self.routable.endpoints(host), host, subset, labels)
        generation = self._generations.get(key, 0)
        if previous is None or previous.members.endpoints != members.endpoints:
            generation += 1
        self._generations[key] = generation
        members = EndpointSet(host, subset, members.endpoints, generation)
        # Istio's auto mTLS: the mesh's certificates where a sidecar answers, plaintext to
        # endpoints outside the mesh (a MESH_EXTERNAL ServiceEntry).
        auto = DISABLE if entry is not None and entry.external else ISTIO_MUTUAL
        cluster = Cluster(
            members,
            policy,
            extensions,
            self.tracker,
            self.clock,
            previous,
            tls=auto,
            locality=self.locality,
        )
        self._clusters[key] = cluster
        return cluster

    @functools.cached_property
    def known_hosts(self) -> frozenset[str]:
        """Hosts that config or discovery names (an :authority must name one of them)."""
        config = self.config
        return (
            frozenset(config.virtual_services)
            | frozenset(config.destination_rules)
            | frozenset(self.routable.hosts())
        )

    def known(self) -> list[tuple[str, str]]:
        """Every host/subset that config or discovery names."""
        keys = {(h, "") for h in self.routable.hosts()}
        for rule in self.config.destination_rules.values():
            keys.add((rule.host, ""))
            keys.update((rule.host, s.name) for s in rule.subsets)
        keys.update(self._clusters)
        return sorted(keys)
