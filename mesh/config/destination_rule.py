"""DestinationRule: subsets by labels and the traffic policy for a host (balancing, ejection)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mesh.balance.maglev import DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, is_prime
from mesh.config.autoscale import ANNOTATIONS as AUTOSCALE_ANNOTATIONS
from mesh.config.autoscale import AutoscaleSettings, parse_autoscale
from mesh.config.client_tls import ClientTls, parse_client_tls
from mesh.config.fields import Node
from mesh.config.resource import Metadata, export_to, resource_host

#: Istio's defaults for outlierDetection fields that are left out.
DEFAULT_CONSECUTIVE_5XX = 5
DEFAULT_INTERVAL = 10.0
DEFAULT_BASE_EJECTION_TIME = 30.0
DEFAULT_MAX_EJECTION_PERCENT = 10
DEFAULT_MIN_HEALTH_PERCENT = 0
#: Envoy's cap on an ejection that grows with each repeat (max_ejection_time).
MAX_EJECTION_TIME = 300.0
#: Envoy's ring-hash default minimum ring size.
DEFAULT_MINIMUM_RING_SIZE = 1024
#: Istio's "unlimited" for connection-pool counters.
UNLIMITED = 2**32 - 1

SimplePolicy = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"]
#: Istio's default load balancer since 1.14.
DEFAULT_SIMPLE: SimplePolicy = "LEAST_REQUEST"


@dataclass(frozen=True)
class ConsistentHash:
    """``consistentHash``: the key comes from a header (Istio) and/or request fields (meshserve)."""

    http_header_name: str | None = None
    minimum_ring_size: int = DEFAULT_MINIMUM_RING_SIZE
    #: ``useSourceIp``: the client's IP address is the key.
    use_source_ip: bool = False
    #: ``maglev.tableSize``: Envoy's Maglev table of this (prime) size instead of the
    #: ring; None: the ring.
    maglev_table_size: int | None = None


@dataclass(frozen=True)
class LocalitySetting:
    """``localityLbSetting``; absent, Istio's mesh default: enabled, no distribute or failover
    (priorities by locality whenever outlier detection is on)."""

    enabled: bool = True
    #: (from, ((to, weight), ...)) in order; the first whose ``from`` matches applies.
    distribute: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    #: (from region, to region).
    failover: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LoadBalancer:
    """Exactly one of ``simple`` or ``consistent_hash`` is set."""

    simple: SimplePolicy | None = DEFAULT_SIMPLE
    consistent_hash: ConsistentHash | None = None
    locality: LocalitySetting = LocalitySetting()

    def describe(self) -> str:
        if self.consistent_hash is not None:
            return "consistentHash"
        return self.simple or DEFAULT_SIMPLE


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx_errors: int = DEFAULT_CONSECUTIVE_5XX
    #: 0 disables; gateway errors are UNAVAILABLE/DEADLINE_EXCEEDED and connection failures.
    consecutive_gateway_errors: int = 0
    interval: float = DEFAULT_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT
    min_health_percent: int = DEFAULT_MIN_HEALTH_PERCENT


@dataclass(frozen=True)
class ConnectionPool:
    """``connectionPool``: Envoy's circuit breakers and connection pool for the cluster,
    with Istio's defaults (every limit unlimited; 0 in the YAML means the default). The
    relay enforces them with Envoy's meaning for HTTP/2 upstreams
    (mesh/routing/circuit.py)."""

    #: ``http.http2MaxRequests``: calls in flight to the cluster (max_requests).
    http2_max_requests: int = UNLIMITED
    #: ``tcp.maxConnections``: connections to all the cluster's hosts (max_connections).
    max_connections: int = UNLIMITED
    #: ``http.http1MaxPendingRequests``: calls waiting for a connection or for stream
    #: capacity on one (max_pending_requests).
    max_pending_requests: int = UNLIMITED
    #: ``http.maxRetries``: retries outstanding to the cluster at once (max_retries).
    max_retries: int = UNLIMITED
    #: ``http.maxRequestsPerConnection``: streams one upstream connection carries before
    #: it is drained and another takes the next calls.
    max_requests_per_connection: int = UNLIMITED
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class TrafficPolicy:
    load_balancer: LoadBalancer = LoadBalancer()
    #: None: outlier detection is off, as in Istio when the block is absent.
    outlier_detection: OutlierDetection | None = None
    connection_pool: ConnectionPool = ConnectionPool()
    #: None: Istio's auto mTLS (the mesh's mTLS to registered services, plaintext to a
    #: MESH_EXTERNAL ServiceEntry).
    tls: ClientTls | None = None


#: The blocks a policy level sets (the others come from the level below), by field name.
Patch = dict[str, Any]


@dataclass(frozen=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    #: The host's policy with this subset's overrides already applied.
    traffic_policy: TrafficPolicy


#: meshserve's extension annotations on a DestinationRule, with their defaults.
ANNOTATION_HASH_FIELDS = "meshserve.io/hash-fields"
ANNOTATION_BOUNDED_LOAD = "meshserve.io/bounded-load"
ANNOTATION_HOT_KEY_REPLICAS = "meshserve.io/hot-key-replicas"
ANNOTATION_HOT_KEY_THRESHOLD = "meshserve.io/hot-key-threshold"
ANNOTATION_COLD_SPILL = "meshserve.io/cold-spill"
ANNOTATION_RING_POINTS = "meshserve.io/ring-points"
ANNOTATION_RETRY_ORDER = "meshserve.io/retry-order"
ANNOTATION_RETRY_METHODS = "meshserve.io/retry-methods"
#: ``meshserve.io/ring-points``: Envoy's whole ring (Istio's) or points per endpoint.
RING_POINTS = ("whole-ring", "per-endpoint")
#: ``meshserve.io/retry-order``: Envoy's rehashed picks (Istio's) or ring successors.
RETRY_ORDERS = ("rehash", "ring-successor")
#: ``meshserve.io/retry-methods``: every method ``retryOn`` covers (Envoy's, Istio's) or
#: only idempotent ones on a status (a call the upstream never saw is retried either way).
RETRY_METHODS = ("any", "idempotent")
DEFAULT_COLD_SPILL = 2.0
#: The factor the docs suggest (and config/inference.yaml sets); bounded loads are off
#: unless the annotation asks for them.
DEFAULT_BOUNDED_LOAD = 1.25
DEFAULT_HOT_KEY_THRESHOLD = 4
#: Request fields a hash key may be read from: names → field numbers of ModelInferRequest
#: (and of ModelReadyRequest/ModelMetadataRequest, which share numbers 1 and 2).
HASH_FIELDS: dict[str, int] = {"model_name": 1, "model_version": 2}


@dataclass(frozen=True)
class Extensions:
    """meshserve behaviour beyond Istio, read from ``metadata.annotations``."""

    #: Request fields that form the hash key, in order; empty: no field hashing.
    hash_fields: tuple[str, ...] = ()
    #: Bounded-load factor c (capacity ⌈c·average⌉); None (Istio's plain consistent
    #: hashing, the default) disables bounded loads.
    bounded_load: float | None = None
    #: Ring successors a hot key is spread over (1: never spread).
    hot_key_replicas: int = 1
    #: In-flight requests for one key from which it counts as hot.
    hot_key_threshold: int = DEFAULT_HOT_KEY_THRESHOLD
    #: How far past capacity a full owner keeps a key no successor holds warm.
    cold_spill: float = DEFAULT_COLD_SPILL
    #: Each endpoint owns weight * minimumRingSize points (keys stay put when endpoints
    #: come and go); False: minimumRingSize is the whole ring, as in Envoy.
    per_endpoint_ring: bool = False
    #: Retries (and spills) go to ring successors clockwise; False: Envoy's rehashed picks.
    successor_retries: bool = False
    #: A status ``retryOn`` lists is retried only for idempotent methods (the upstream may
    #: have run the call); False: for any method, as Envoy does.
    retry_idempotent_only: bool = False
    #: How the host's replicas follow load (``meshserve.io/autoscale-*``; used by an
    #: autoscaler: ``up --autoscale``, or the Kubernetes adapter).
    autoscale: AutoscaleSettings = field(default_factory=AutoscaleSettings)


@dataclass(frozen=True)
class DestinationRule:
    metadata: Metadata
    host: str
    traffic_policy: TrafficPolicy
    subsets: tuple[Subset, ...]
    extensions: Extensions = Extensions()
    export_to: tuple[str, ...] = ()
    #: Policies at the ports ``portLevelSettings`` name, by (subset or "", port number),
    #: resolved in Istio's order: host, host's port, subset, subset's port.
    port_policies: tuple[tuple[tuple[str, int], TrafficPolicy], ...] = ()

    @property
    def ref(self) -> str:
        return f"DestinationRule/{self.metadata.name}"

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def policy_for(self, subset: str | None, port: int | None = None) -> TrafficPolicy:
        found = self.subset(subset) if subset else None
        if port is not None and self.port_policies:
            key = (found.name if found else "", port)
            at_port = dict(self.port_policies).get(key)
            if at_port is not None:
                return at_port
        return found.traffic_policy if found else self.traffic_policy

    @property
    def has_port_settings(self) -> bool:
        return bool(self.port_policies)


def parse_destination_rule(spec: Node, metadata: Metadata, annotations: Node) -> DestinationRule:
    spec.mapping(
        ("host", "trafficPolicy", "subsets", "exportTo"),
        unsupported=("workloadSelector",),
        required=("host",),
    )
    host = resource_host(spec.child("host"), metadata.namespace)
    host_patch, host_ports = _policy_level(spec.child("trafficPolicy"))
    policy = _apply(TrafficPolicy(), host_patch)
    subsets: list[Subset] = []
    subset_levels: list[tuple[str, Patch, dict[int, Patch]]] = []
    for item in spec.child("subsets").items():
        item.mapping(("name", "labels", "trafficPolicy"), required=("name",))
        name = item.child("name").string()
        if any(s.name == name for s in subsets):
            item.child("name").fail(f"duplicate subset {name!r}")
        labels = tuple(sorted(item.child("labels").string_map().items()))
        patch, ports = _policy_level(item.child("trafficPolicy"))
        subset_levels.append((name, patch, ports))
        subsets.append(Subset(name, labels, _apply(policy, patch)))
    port_policies: dict[tuple[str, int], TrafficPolicy] = {}
    numbers = set(host_ports).union(*(ports for _, _, ports in subset_levels))
    for number in sorted(numbers):
        at_host = _apply(policy, host_ports.get(number, {}))
        if number in host_ports:
            port_policies[("", number)] = at_host
        for name, patch, ports in subset_levels:
            # Istio's order: host, host's port level, the subset, the subset's port level.
            port_policies[(name, number)] = _apply(_apply(at_host, patch), ports.get(number, {}))
    extensions = parse_extensions(annotations, dict(metadata.annotations))
    _check_hash_sources(spec, policy, subsets, extensions, port_policies)
    return DestinationRule(
        metadata=metadata,
        host=host,
        traffic_policy=policy,
        subsets=tuple(subsets),
        extensions=extensions,
        export_to=export_to(spec.child("exportTo"), metadata.namespace),
        port_policies=tuple(port_policies.items()),
    )


def _check_hash_sources(
    spec: Node,
    policy: TrafficPolicy,
    subsets: list[Subset],
    extensions: Extensions,
    port_policies: dict[tuple[str, int], TrafficPolicy],
) -> None:
    """A ring needs a key: a header, request fields, or both."""
    places = [("trafficPolicy", policy)] + [
        (f"subsets[{i}].trafficPolicy", s.traffic_policy) for i, s in enumerate(subsets)
    ]
    # A port's policy may turn hashing on too (its path: the level that set it).
    places += [("trafficPolicy.portLevelSettings", p) for p in port_policies.values()]
    hashing = False
    for path, p in places:
        ch = p.load_balancer.consistent_hash
        if ch is None:
            continue
        hashing = True
        if ch.maglev_table_size is not None and extensions.per_endpoint_ring:
            spec.child(path).child("loadBalancer").child("consistentHash").child("maglev").fail(
                f"the {ANNOTATION_RING_POINTS} annotation shapes the ring; a Maglev table "
                "has no points per endpoint"
            )
        if ch.use_source_ip:
            if extensions.hash_fields:
                spec.child(path).child("loadBalancer").child("consistentHash").fail(
                    f"useSourceIp takes the key from the client's address: the "
                    f"{ANNOTATION_HASH_FIELDS} annotation would have no effect"
                )
        elif ch.http_header_name is None and not extensions.hash_fields:
            spec.child(path).child("loadBalancer").child("consistentHash").fail(
                f"needs httpHeaderName, useSourceIp or the {ANNOTATION_HASH_FIELDS} annotation"
            )
    if extensions.hash_fields and not hashing:
        spec.fail(
            f"annotation {ANNOTATION_HASH_FIELDS} needs a consistentHash loadBalancer "
            "in trafficPolicy or a subset"
        )


def _policy_level(node: Node) -> tuple[Patch, dict[int, Patch]]:
    """One ``trafficPolicy``: the blocks it sets, and its ``portLevelSettings`` by port.

    A level overrides the one below per block (a subset's ``loadBalancer`` replaces the
    host's, its absent ``outlierDetection`` keeps the host's), as Istio merges them.
    """
    if node.value is None:
        return {}, {}
    node.mapping(
        ("loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings"),
        unsupported=("tunnel", "proxyProtocol"),
    )
    ports: dict[int, Patch] = {}
    for item in node.child("portLevelSettings").items():
        item.mapping(
            ("port", "loadBalancer", "connectionPool", "outlierDetection", "tls"),
            required=("port",),
        )
        number = item.child("port").mapping(("number",), required=("number",))
        port = number.child("number").integer(0, 1, 65535)
        if port in ports:
            number.child("number").fail(f"duplicate port {port}")
        ports[port] = _patch(item)
    return _patch(node), ports


def _patch(node: Node) -> Patch:
    patch: Patch = {}
    if node.has("loadBalancer"):
        patch["load_balancer"] = _load_balancer(node.child("loadBalancer"))
    if node.has("outlierDetection"):
        patch["outlier_detection"] = _outlier(node.child("outlierDetection"))
    if node.has("connectionPool"):
        patch["connection_pool"] = _connection_pool(node.child("connectionPool"))
    if node.has("tls"):
        patch["tls"] = parse_client_tls(node.child("tls"))
    return patch


def _apply(base: TrafficPolicy, patch: Patch) -> TrafficPolicy:
    return replace(base, **patch) if patch else base


def _load_balancer(node: Node) -> LoadBalancer:
    node.mapping(
        ("simple", "consistentHash", "localityLbSetting"),
        unsupported=("warmupDurationSecs", "warmup"),
    )
    locality = _locality(node.child("localityLbSetting"))
    if node.has("simple") and node.has("consistentHash"):
        node.fail("must have exactly one of simple or consistentHash")
    if not node.has("simple") and not node.has("consistentHash"):
        if not node.has("localityLbSetting"):
            node.fail("must have exactly one of simple or consistentHash")
        return LoadBalancer(locality=locality)  # Istio's default balancer, with the setting
    if node.has("simple"):
        simple = node.child("simple").choice(
            ("UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "LEAST_CONN", "PASSTHROUGH")
        )
        if simple == "PASSTHROUGH":
            # Istio sends the call to the address the caller dialled, bypassing balancing;
            # a mesh call names a service, not an endpoint, so there is none to pass to.
            node.child("simple").fail(
                "PASSTHROUGH is an Istio value that meshserve does not support"
            )
        # LEAST_CONN is Istio's deprecated alias of LEAST_REQUEST; UNSPECIFIED is the default.
        name: SimplePolicy = (
            "LEAST_REQUEST" if simple in ("LEAST_CONN", "UNSPECIFIED") else simple  # type: ignore[assignment]
        )
        return LoadBalancer(simple=name, locality=locality)
    ch = node.child("consistentHash").mapping(
        ("httpHeaderName", "ringHash", "minimumRingSize", "useSourceIp", "maglev"),
        unsupported=("httpCookie", "httpQueryParameterName"),
    )
    header = ch.child("httpHeaderName").opt_string()
    if header is not None:
        header = header.lower()
    source_ip = ch.child("useSourceIp").boolean(False)
    if source_ip and header is not None:
        # One hash key in Istio's proto (a oneof): two would leave the key ambiguous.
        ch.child("useSourceIp").fail("set httpHeaderName or useSourceIp, not both")
    if ch.has("ringHash") and ch.has("minimumRingSize"):
        ch.fail("set ringHash.minimumRingSize or the deprecated minimumRingSize, not both")
    maglev: int | None = None
    if ch.has("maglev"):
        # One hash algorithm in Istio's proto (a oneof): a ring size would be ignored.
        for other in ("ringHash", "minimumRingSize"):
            if ch.has(other):
                ch.child("maglev").fail(f"set maglev or {other}, not both")
        table = ch.child("maglev").mapping(("tableSize",)).child("tableSize")
        # 0 is the proto's unset value: Envoy's default, 65537.
        maglev = table.integer(0, 0, MAX_TABLE_SIZE) or DEFAULT_TABLE_SIZE
        if not is_prime(maglev):
            table.fail(f"must be a prime number (Envoy's rule), got {maglev}")
    size_node = ch.child("minimumRingSize")
    if ch.has("ringHash"):
        size_node = ch.child("ringHash").mapping(("minimumRingSize",)).child("minimumRingSize")
    # 0 is the proto's unset value: Envoy's default, as in Istio.
    size = size_node.integer(0, 0, 8_388_608) or DEFAULT_MINIMUM_RING_SIZE
    return LoadBalancer(
        simple=None,
        consistent_hash=ConsistentHash(header, size, source_ip, maglev),
        locality=locality,
    )


def _locality(node: Node) -> LocalitySetting:
    if node.value is None:
        return LocalitySetting()
    node.mapping(
        ("enabled", "distribute", "failover"),
        # failoverPriority ranks by arbitrary labels (network, cluster...), which meshserve's
        # proxies do not carry.
        unsupported=("failoverPriority",),
    )
    if node.has("distribute") and node.has("failover"):
        node.fail("set distribute or failover, not both (Istio's rule)")
    distribute = []
    for item in node.child("distribute").items():
        item.mapping(("from", "to"), required=("from", "to"))
        source = _locality_pattern(item.child("from"))
        targets = []
        for pattern, weight in item.child("to").entries():
            _locality_pattern(Node(pattern, weight.where, weight.path))
            targets.append((pattern, weight.integer(0, 1, 100)))
        if sum(w for _, w in targets) != 100:
            item.child("to").fail(f"weights must sum to 100, got {sum(w for _, w in targets)}")
        distribute.append((source, tuple(targets)))
    failover = []
    for item in node.child("failover").items():
        item.mapping(("from", "to"), required=("from", "to"))
        source, target = item.child("from").string(), item.child("to").string()
        for child in ("from", "to"):
            if "/" in item.child(child).string() or "*" in item.child(child).string():
                item.child(child).fail("must be a region (no zone, no wildcard)")
        if source == target:
            item.child("to").fail(f"fails over to its own region {source!r}")
        failover.append((source, target))
    return LocalitySetting(
        enabled=node.child("enabled").boolean(True),
        distribute=tuple(distribute),
        failover=tuple(failover),
    )


def _locality_pattern(node: Node) -> str:
    text = node.string()
    parts = text.split("/")
    if len(parts) > 3 or any(not p for p in parts) or any("*" in p for p in parts[:-1]):
        node.fail(
            "must be region[/zone[/subzone]], with * only as the last part "
            f"(e.g. us-west/zone1/* or *), got {text!r}"
        )
    if "*" in parts[-1] and parts[-1] != "*":
        node.fail(f"* must be a whole part, got {text!r}")
    return text


def _outlier(node: Node) -> OutlierDetection:
    node.mapping(
        (
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
        ),
        unsupported=(
            "consecutiveErrors",
            "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures",
        ),
    )
    return OutlierDetection(
        consecutive_5xx_errors=node.child("consecutive5xxErrors").integer(
            DEFAULT_CONSECUTIVE_5XX, 0, UNLIMITED
        ),
        consecutive_gateway_errors=node.child("consecutiveGatewayErrors").integer(0, 0, UNLIMITED),
        interval=node.child("interval").duration(DEFAULT_INTERVAL),
        base_ejection_time=node.child("baseEjectionTime").duration(DEFAULT_BASE_EJECTION_TIME),
        # Istio passes maxEjectionPercent to Envoy only when above 0: 0 is Envoy's default
        # (10 %), not "never eject".
        max_ejection_percent=node.child("maxEjectionPercent").integer(
            DEFAULT_MAX_EJECTION_PERCENT, 0, 100
        )
        or DEFAULT_MAX_EJECTION_PERCENT,
        min_health_percent=node.child("minHealthPercent").integer(
            DEFAULT_MIN_HEALTH_PERCENT, 0, 100
        ),
    )


def _connection_pool(node: Node) -> ConnectionPool:
    node.mapping(("http", "tcp"))
    http = node.child("http")
    tcp = node.child("tcp")
    if http.value is not None:
        http.mapping(
            (
                "http2MaxRequests",
                "maxRequestsPerConnection",
                "maxRetries",
                "http1MaxPendingRequests",
            ),
            unsupported=(
                "idleTimeout",
                "h2UpgradePolicy",
                "useClientProtocol",
                "maxConcurrentStreams",
            ),
        )
    if tcp.value is not None:
        tcp.mapping(
            ("maxConnections", "connectTimeout"),
            unsupported=("tcpKeepalive", "maxConnectionDuration", "idleTimeout"),
        )

    def limit(block: Node, key: str) -> int:
        # 0 is the proto's unset value: Istio's default (2^32-1, unlimited).
        return block.child(key).integer(0, 0, UNLIMITED) or UNLIMITED

    return ConnectionPool(
        http2_max_requests=limit(http, "http2MaxRequests"),
        max_connections=limit(tcp, "maxConnections"),
        max_pending_requests=limit(http, "http1MaxPendingRequests"),
        max_retries=limit(http, "maxRetries"),
        max_requests_per_connection=limit(http, "maxRequestsPerConnection"),
        connect_timeout=tcp.child("connectTimeout").duration(10.0),
    )


def parse_extensions(node: Node, annotations: dict[str, str]) -> Extensions:
    """Reads the ``meshserve.io/*`` annotations; other annotations are left to their owners."""
    known = (
        ANNOTATION_HASH_FIELDS,
        ANNOTATION_BOUNDED_LOAD,
        ANNOTATION_HOT_KEY_REPLICAS,
        ANNOTATION_HOT_KEY_THRESHOLD,
        ANNOTATION_COLD_SPILL,
        ANNOTATION_RING_POINTS,
        ANNOTATION_RETRY_ORDER,
        ANNOTATION_RETRY_METHODS,
        *AUTOSCALE_ANNOTATIONS,
    )
    for key in annotations:
        if key.startswith("meshserve.io/") and key not in known:
            node.child(key).fail(
                f"unknown meshserve annotation (expected one of: {', '.join(known)})"
            )
    ext = Extensions()
    if (text := annotations.get(ANNOTATION_HASH_FIELDS)) is not None:
        fields = tuple(f.strip() for f in text.split(",") if f.strip())
        for f in fields:
            if f not in HASH_FIELDS:
                node.child(ANNOTATION_HASH_FIELDS).fail(
                    f"unknown request field {f!r} (expected some of: {', '.join(HASH_FIELDS)})"
                )
        if not fields or len(set(fields)) != len(fields):
            node.child(ANNOTATION_HASH_FIELDS).fail(
                "must list distinct field names, comma-separated"
            )
        ext = replace(ext, hash_fields=fields)
    if (text := annotations.get(ANNOTATION_BOUNDED_LOAD)) is not None:
        bounded: float | None
        if text.strip().lower() in ("off", "0", "false", "none"):
            bounded = None
        else:
            bounded = _float(text)
            if bounded is None or not (math.isfinite(bounded) and bounded >= 1.0):
                node.child(ANNOTATION_BOUNDED_LOAD).fail(
                    f'must be a factor >= 1.0 (e.g. "1.25") or "off", got {text!r}'
                )
        ext = replace(ext, bounded_load=bounded)
    if (text := annotations.get(ANNOTATION_COLD_SPILL)) is not None:
        spill = _float(text)
        if spill is None or not (math.isfinite(spill) and spill >= 1.0):
            node.child(ANNOTATION_COLD_SPILL).fail(
                f'must be a factor >= 1.0 (e.g. "2"; "1" is classic bounded loads), got {text!r}'
            )
        ext = replace(ext, cold_spill=spill)
    if (text := annotations.get(ANNOTATION_RING_POINTS)) is not None:
        if text not in RING_POINTS:
            node.child(ANNOTATION_RING_POINTS).fail(
                f"must be one of {', '.join(RING_POINTS)}, got {text!r}"
            )
        ext = replace(ext, per_endpoint_ring=text == "per-endpoint")
    if (text := annotations.get(ANNOTATION_RETRY_ORDER)) is not None:
        if text not in RETRY_ORDERS:
            node.child(ANNOTATION_RETRY_ORDER).fail(
                f"must be one of {', '.join(RETRY_ORDERS)}, got {text!r}"
            )
        ext = replace(ext, successor_retries=text == "ring-successor")
    if (text := annotations.get(ANNOTATION_RETRY_METHODS)) is not None:
        if text not in RETRY_METHODS:
            node.child(ANNOTATION_RETRY_METHODS).fail(
                f"must be one of {', '.join(RETRY_METHODS)}, got {text!r}"
            )
        ext = replace(ext, retry_idempotent_only=text == "idempotent")
    replicas = _count(node, annotations, ANNOTATION_HOT_KEY_REPLICAS, ext.hot_key_replicas)
    threshold = _count(node, annotations, ANNOTATION_HOT_KEY_THRESHOLD, ext.hot_key_threshold)
    return replace(
        ext,
        hot_key_replicas=replicas,
        hot_key_threshold=threshold,
        autoscale=parse_autoscale(node, annotations),
    )


def _count(node: Node, annotations: dict[str, str], key: str, default: int) -> int:
    text = annotations.get(key)
    if text is None:
        return default
    if not text.strip().isdigit() or not 1 <= int(text) <= 1024:
        node.child(key).fail(f"must be an integer in [1, 1024] as a string, got {text!r}")
    return int(text)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
