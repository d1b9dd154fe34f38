"""Istio's documented examples, field by field: each behaves as Istio documents it
(asserted through the routing core) or is refused naming the field (issue 14).

The examples are written from Istio's reference pages (networking VirtualService and
DestinationRule, security PeerAuthentication and AuthorizationPolicy) with their hosts
renamed to mesh services.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import grpc
import pytest

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.config.destination_rule import UNLIMITED, DestinationRule
from mesh.config.fields import ConfigError
from mesh.config.loader import parse_yaml
from mesh.config.request_authn import RequestAuthentication
from mesh.config.security import AuthorizationPolicy, PeerAuthentication
from mesh.config.snapshot import MeshConfig, config_from_yaml
from mesh.config.views import DEFAULT_INGRESS_LABELS, MESH_VIEW, View, ingress_view
from mesh.errors import Unimplemented
from mesh.routing import circuit
from mesh.routing.circuit import CircuitBreakers
from mesh.routing.decision import RequestInfo, RouteDecision, decide
from mesh.routing.discovery import StaticInstance
from mesh.security.authz import RequestAttributes, evaluate
from mesh.security.peer import resolve_mode
from mesh.security.request_authn import applicable_rules
from mesh.security.workload import Workload

INFER = "/inference.GRPCInferenceService/ModelInfer"
READY = "/inference.GRPCInferenceService/ModelReady"
UNSUPPORTED = "is an Istio field that meshserve does not support"


def vs(http: str, *, spec: str = "", metadata: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata:\n  name: inference\n{metadata}"
        f"spec:\n  hosts: [inference]\n{spec}  http:\n{http}"
    )


def dr(body: str, *, metadata: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata:\n  name: inference\n{metadata}spec:\n  host: inference\n{body}"
    )


def authz(spec: str) -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: policy}}\nspec:\n{spec}"
    )


VERSIONS = dr(
    "  subsets:\n    - {name: v1, labels: {version: v1}}\n    - {name: v2, labels: {version: v2}}\n"
)
ROUTE = "    - route: [{destination: {host: inference}}]\n"


def instances() -> list[StaticInstance]:
    return [
        StaticInstance("inference", f"w{i}", f"10.0.0.{i}:8001", {"version": f"v{i % 2 + 1}"})
        for i in range(4)
    ]


def route(
    config: MeshConfig,
    method: str = INFER,
    *,
    seed: int = 1,
    headers: dict[str, str] | None = None,
) -> RouteDecision:
    clusters = ClusterMap(
        config, EndpointsSnapshot.from_instances(instances()), LoadTracker(), lambda: 0.0
    )
    return decide(
        clusters, RequestInfo(method, tuple((headers or {}).items())), random.Random(seed)
    )


def one(text: str) -> object:
    (document,) = parse_yaml(text, "istio.yaml")
    return document.resource


# --- works as Istio documents it ---------------------------------------------------------


def headers_route_to_a_subset() -> None:
    """VirtualService docs: ``end-user: {exact: jason}`` → v2, everyone else v1."""
    config = config_from_yaml(
        vs(
            "    - match: [{headers: {end-user: {exact: jason}}}]\n"
            "      route: [{destination: {host: inference, subset: v2}}]\n"
            "    - route: [{destination: {host: inference, subset: v1}}]\n"
        )
        + "---\n"
        + VERSIONS,
        source="istio.yaml",
    )
    assert route(config, headers={"end-user": "jason"}).subset == "v2"
    assert route(config, headers={"end-user": "sam"}).subset == "v1"


def weights_are_relative() -> None:
    """Istio sends weight/sum: 1 and 3 split a quarter / three quarters."""
    config = config_from_yaml(
        vs(
            "    - route:\n"
            "      - {destination: {host: inference, subset: v1}, weight: 1}\n"
            "      - {destination: {host: inference, subset: v2}, weight: 3}\n"
        )
        + "---\n"
        + VERSIONS,
        source="istio.yaml",
    )
    picks = Counter(route(config, seed=seed).subset for seed in range(2000))
    assert 0.2 < picks["v1"] / 2000 < 0.3


def regexes_are_re2() -> None:
    """``\\pL`` and ``\\z`` are RE2 (Python's re refuses both); the match is whole."""
    config = config_from_yaml(
        vs(
            "    - match: [{headers: {x-user: {regex: '\\pL+\\z'}}}]\n"
            "      route: [{destination: {host: inference, subset: v2}}]\n" + ROUTE
        )
        + "---\n"
        + VERSIONS,
        source="istio.yaml",
    )
    assert route(config, headers={"x-user": "jäson"}).subset == "v2"
    assert route(config, headers={"x-user": "jason1"}).subset == ""


def ignore_uri_case_on_prefix() -> None:
    config = config_from_yaml(
        vs(
            "    - match: [{uri: {prefix: /INFERENCE.grpcinferenceservice/}, ignoreUriCase: true}]\n"
            "      route: [{destination: {host: inference, subset: v2}}]\n"
        )
        + "---\n"
        + VERSIONS,
        source="istio.yaml",
    )
    assert route(config).subset == "v2"


def no_matching_rule_is_no_route() -> None:
    """Envoy answers a request no rule matches with 404: gRPC UNIMPLEMENTED."""
    config = config_from_yaml(
        vs(
            "    - match: [{uri: {exact: " + INFER + "}}]\n"
            "      route: [{destination: {host: inference}}]\n"
        ),
        source="istio.yaml",
    )
    assert route(config).host == "inference"
    with pytest.raises(Unimplemented) as caught:
        route(config, READY)
    assert caught.value.code is grpc.StatusCode.UNIMPLEMENTED
    assert "no rule of VirtualService/inference matches" in str(caught.value)


def retries_without_attempts_disable_retries() -> None:
    config = config_from_yaml(vs(ROUTE + "      retries: {}\n"), source="istio.yaml")
    assert route(config).retries.attempts == 0


def retry_on_takes_numeric_codes() -> None:
    """``retryOn: 503,connect-failure``: Istio's retriable status codes."""
    config = config_from_yaml(
        vs(ROUTE + "      retries: {attempts: 3, retryOn: '503,connect-failure'}\n"),
        source="istio.yaml",
    )
    retries = route(config).retries
    assert retries.attempts == 3 and retries.status_codes == {503}
    assert retries.should_retry(grpc.StatusCode.UNAVAILABLE)
    assert not retries.should_retry(grpc.StatusCode.INTERNAL)
    assert retries.should_retry(grpc.StatusCode.INTERNAL, connection_failure=True)


def upper_case_header_edits() -> None:
    config = config_from_yaml(
        vs(ROUTE + "      headers: {request: {set: {X-Model-Version: '2'}}}\n"),
        source="istio.yaml",
    )
    assert ("x-model-version", "2") in route(config).metadata


def export_to_everyone_and_own_namespace() -> None:
    for export in ("['*']", "['.']", "[meshserve]"):
        config = config_from_yaml(vs(ROUTE, spec=f"  exportTo: {export}\n"), source="istio.yaml")
        assert route(config).host == "inference"


def fqdn_hosts_from_another_namespace() -> None:
    text = vs(ROUTE, metadata="  namespace: ops\n").replace(
        "hosts: [inference]", "hosts: [inference.meshserve.svc.cluster.local]"
    )
    text = text.replace("host: inference}", "host: inference.meshserve.svc.cluster.local}")
    assert route(config_from_yaml(text, source="istio.yaml")).host == "inference"


def simple_unspecified_is_the_default() -> None:
    rule = one(dr("  trafficPolicy: {loadBalancer: {simple: UNSPECIFIED}}\n"))
    assert isinstance(rule, DestinationRule)
    assert rule.traffic_policy.load_balancer.simple == "LEAST_REQUEST"


def zero_means_the_default() -> None:
    rule = one(
        dr(
            "  trafficPolicy:\n"
            "    connectionPool: {http: {http2MaxRequests: 0, maxRequestsPerConnection: 0,"
            " maxRetries: 0, http1MaxPendingRequests: 0}, tcp: {maxConnections: 0}}\n"
            "    loadBalancer: {consistentHash: {httpHeaderName: x-user,"
            " ringHash: {minimumRingSize: 0}}}\n"
        )
    )
    assert isinstance(rule, DestinationRule)
    pool = rule.traffic_policy.connection_pool
    assert pool.http2_max_requests == UNLIMITED
    assert pool.max_requests_per_connection == pool.max_retries == UNLIMITED
    assert pool.max_pending_requests == pool.max_connections == UNLIMITED
    ch = rule.traffic_policy.load_balancer.consistent_hash
    assert ch is not None and ch.minimum_ring_size == 1024


def connection_pool_limits() -> None:
    """Istio's circuit-breaker example: each limit as Envoy's breaker of that name."""
    rule = one(
        dr(
            "  trafficPolicy:\n"
            "    connectionPool:\n"
            "      tcp: {maxConnections: 100}\n"
            "      http: {http2MaxRequests: 1000, maxRequestsPerConnection: 10,"
            " http1MaxPendingRequests: 2, maxRetries: 3}\n"
        )
    )
    assert isinstance(rule, DestinationRule)
    pool = rule.traffic_policy.connection_pool
    assert (pool.max_connections, pool.http2_max_requests) == (100, 1000)
    assert (pool.max_requests_per_connection, pool.max_pending_requests) == (10, 2)
    assert pool.max_retries == 3
    breakers = CircuitBreakers()
    assert breakers.add_pending(pool) and breakers.add_pending(pool)
    assert not breakers.add_pending(pool)  # the third waiting call is shed
    assert [breakers.start_retry(pool) for _ in range(4)] == [True, True, True, False]
    assert circuit.spent(pool, 10) and not circuit.spent(pool, 9)


def connect_timeout() -> None:
    """DestinationRule docs: ``tcp: {maxConnections: 100, connectTimeout: 30ms}``; the
    relay bounds each connect by it (tests/gateway/test_relay_protocol.py)."""
    rule = one(
        dr(
            "  trafficPolicy: {connectionPool: {tcp: {maxConnections: 100, connectTimeout: 30ms}}}\n"
        )
    )
    assert isinstance(rule, DestinationRule)
    pool = rule.traffic_policy.connection_pool
    assert (pool.max_connections, pool.connect_timeout) == (100, 0.03)


def ring_size_is_the_whole_ring() -> None:
    config = config_from_yaml(
        dr(
            "  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user,"
            " ringHash: {minimumRingSize: 1024}}}}\n"
        ),
        source="istio.yaml",
    )
    clusters = ClusterMap(
        config, EndpointsSnapshot.from_instances(instances()), LoadTracker(), lambda: 0.0
    )
    ring = clusters.cluster("inference").ring
    assert ring is not None and sum(ring.points().values()) == 1024
    # Retries as Envoy picks them on a ring: rehashed, never a host twice.
    order = route(config, headers={"x-user": "u1"}).candidates
    assert order == ring.order("u1", successors=False)


def kubectl_exports_are_accepted() -> None:
    text = (
        vs(
            ROUTE,
            metadata=(
                "  uid: 0b7f\n  resourceVersion: '42'\n  generation: 3\n"
                "  creationTimestamp: '2024-01-01T00:00:00Z'\n"
                "  managedFields: [{manager: kubectl, operation: Update}]\n"
                "  ownerReferences: [{kind: Deployment, name: x, uid: y}]\n"
            ),
        )
        + "status: {observedGeneration: 3}\n"
    )
    assert route(config_from_yaml(text, source="istio.yaml")).host == "inference"


def numeric_port_level_mtls() -> None:
    """PeerAuthentication docs: ``portLevelMtls: {8090: {mode: DISABLE}}``."""
    policy = one(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: workload}\nspec:\n  selector: {matchLabels: {app: inference}}\n"
        "  mtls: {mode: STRICT}\n  portLevelMtls:\n    8090: {mode: DISABLE}\n"
    )
    assert isinstance(policy, PeerAuthentication)
    assert policy.port_modes == ((8090, "DISABLE"),)


WORKLOAD = Workload("meshserve", (("app", "inference"),))
GATEWAY = "cluster.local/ns/meshserve/sa/gateway"


def allowed(text: str, request: RequestAttributes) -> bool:
    policy = one(text)
    assert isinstance(policy, AuthorizationPolicy)
    return evaluate((policy,), WORKLOAD, request).allowed


def service_accounts() -> None:
    text = authz("  rules: [{from: [{source: {serviceAccounts: [meshserve/gateway]}}]}]\n")
    assert allowed(text, RequestAttributes(INFER, GATEWAY))
    assert not allowed(text, RequestAttributes(INFER, "cluster.local/ns/ml/sa/gateway"))
    assert not allowed(text, RequestAttributes(INFER))
    deny = authz("  action: DENY\n  rules: [{from: [{source: {notServiceAccounts: [a/b]}}]}]\n")
    assert not allowed(deny, RequestAttributes(INFER, GATEWAY))


def remote_ip_blocks() -> None:
    text = authz("  rules: [{from: [{source: {remoteIpBlocks: [10.1.0.0/16]}}]}]\n")
    assert allowed(text, RequestAttributes(INFER, source_ip="10.1.2.3"))
    assert not allowed(text, RequestAttributes(INFER, source_ip="10.2.2.3"))
    when = authz("  rules: [{when: [{key: remote.ip, notValues: [10.1.0.0/16]}]}]\n")
    assert allowed(when, RequestAttributes(INFER, source_ip="10.2.2.3"))


def path_templates() -> None:
    one_segment = authz(
        "  rules: [{to: [{operation: {paths: ['/inference.GRPCInferenceService/{*}']}}]}]\n"
    )
    assert allowed(one_segment, RequestAttributes(INFER))
    assert not allowed(one_segment, RequestAttributes("/inference.GRPCInferenceService/a/b"))
    assert not allowed(one_segment, RequestAttributes("/other.Service/ModelInfer"))
    any_segments = authz("  rules: [{to: [{operation: {paths: ['/{*}/{**}']}}]}]\n")
    assert allowed(any_segments, RequestAttributes("/a/b/c"))
    assert not allowed(any_segments, RequestAttributes("/a"))


def hosts_ignore_case() -> None:
    text = authz("  rules: [{to: [{operation: {hosts: [Inference.Meshserve]}}]}]\n")
    assert allowed(text, RequestAttributes(INFER, host="inference.MESHSERVE"))
    assert not allowed(text, RequestAttributes(INFER, host="training.meshserve"))


def ingress_policies_in_istio_system() -> None:
    """Istio's ingress task: a DENY by ``ipBlocks`` in ``istio-system`` selecting
    ``istio: ingressgateway``; and a namespace-wide one there, which is mesh-wide. Both
    apply at the gateway (they did nothing, silently, while only ``meshserve`` was root)."""
    ingress = Workload("meshserve", DEFAULT_INGRESS_LABELS)
    for selector in ("  selector: {matchLabels: {istio: ingressgateway}}\n", ""):
        policy = one(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: deny, namespace: istio-system}}\nspec:\n{selector}"
            "  action: DENY\n  rules: [{from: [{source: {ipBlocks: [1.2.3.4, 5.6.7.0/24]}}]}]\n"
        )
        assert isinstance(policy, AuthorizationPolicy)
        assert not evaluate(
            (policy,), ingress, RequestAttributes(INFER, source_ip="5.6.7.8")
        ).allowed
        assert evaluate((policy,), ingress, RequestAttributes(INFER, source_ip="9.9.9.9")).allowed
    # A namespace other than a root one still applies only to its own workloads.
    ops = one(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny, namespace: ops}\nspec:\n  action: DENY\n  rules: [{}]\n"
    )
    assert isinstance(ops, AuthorizationPolicy)
    assert evaluate((ops,), ingress, RequestAttributes(INFER)).allowed


def ingress_jwt_in_istio_system() -> None:
    """Istio's ingress JWT task: a RequestAuthentication in ``istio-system`` selecting
    ``istio: ingressgateway`` validates tokens at the gateway."""
    policy = one(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt-example, namespace: istio-system}\nspec:\n"
        "  selector: {matchLabels: {istio: ingressgateway}}\n"
        "  jwtRules: [{issuer: testing@secure.istio.io, jwksUri: 'file:///jwks.json'}]\n"
    )
    assert isinstance(policy, RequestAuthentication)
    ingress = Workload("meshserve", DEFAULT_INGRESS_LABELS)
    (rule,) = applicable_rules((policy,), ingress)
    assert rule.issuer == "testing@secure.istio.io"
    assert applicable_rules((policy,), WORKLOAD) == ()


def mesh_wide_strict_mtls_in_istio_system() -> None:
    """PeerAuthentication docs: ``default`` in ``istio-system`` with ``mode: STRICT`` is
    the mesh-wide mode."""
    policy = one(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n"
    )
    assert isinstance(policy, PeerAuthentication)
    assert resolve_mode((policy,), WORKLOAD).mode == "STRICT"
    assert resolve_mode((policy,), Workload("ops", (("app", "x"),))).mode == "STRICT"


def max_ejection_percent_zero_is_the_default() -> None:
    """Istio hands ``maxEjectionPercent`` to Envoy only above 0: 0 is Envoy's 10 %, so
    ejection still happens (it never did here while 0 meant "none")."""
    rule = one(dr("  trafficPolicy: {outlierDetection: {maxEjectionPercent: 0}}\n"))
    assert isinstance(rule, DestinationRule)
    policy = rule.traffic_policy.outlier_detection
    assert policy is not None and policy.max_ejection_percent == 10


def gateway_in_istio_system_with_servers_sharing_a_port() -> None:
    """Gateway docs: a Gateway in ``some-config-namespace`` named ``ns/name`` by
    VirtualServices of other namespaces; two servers on one port, each exposing its host
    to one namespace (``ns/host``); ``gateways: [gw, mesh]`` applies in both views."""
    gateway = (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\n"
        "metadata: {name: my-gateway, namespace: istio-system}\nspec:\n"
        "  selector: {istio: ingressgateway}\n  servers:\n"
        "  - port: {number: 8080, name: grpc-a, protocol: GRPC}\n"
        "    hosts: [ml/inference.meshserve.svc.cluster.local]\n"
        "  - port: {number: 8080, name: grpc-b, protocol: GRPC}\n"
        "    hosts: [./training.meshserve.svc.cluster.local]\n"
    )

    def bound(name: str, namespace: str, host: str, gateways: str) -> str:
        fqdn = f"{host}.meshserve.svc.cluster.local"
        return (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec:\n  hosts: [{fqdn}]\n  gateways: {gateways}\n"
            f"  http: [{{route: [{{destination: {{host: {fqdn}}}}}]}}]\n"
        )

    config = config_from_yaml(
        "---\n".join(
            [
                gateway,
                bound("inference", "ml", "inference", "[istio-system/my-gateway, mesh]"),
                # training is exposed to istio-system's own VirtualServices only.
                bound("training", "meshserve", "training", "[istio-system/my-gateway]"),
            ]
        ),
        source="istio.yaml",
    )
    endpoints = EndpointsSnapshot.from_instances(
        [*instances(), StaticInstance("training", "t0", "10.0.1.1:8001")]
    )

    def at(view: View, method: str) -> str:
        clusters = ClusterMap(config, endpoints, LoadTracker(), lambda: 0.0, view=view)
        try:
            return decide(clusters, RequestInfo(method), random.Random(1)).route
        except Unimplemented as exc:
            return str(exc)

    train = "/meshserve.training.v1.Training/SubmitJob"
    ingress = ingress_view(port=8080)
    assert at(ingress, INFER) == "VirtualService/inference http[0]"
    assert at(MESH_VIEW, INFER) == "VirtualService/inference http[0]"
    assert at(ingress, train).startswith("no route: no VirtualService bound to")
    assert at(MESH_VIEW, train) == "default"
    assert at(ingress_view(port=9090), INFER).startswith("no route: no Gateway selects")


def legacy_gateway_names() -> None:
    """Istio resolves ``name.namespace`` and ``name.namespace.svc.cluster.local`` in
    ``gateways`` to ``namespace/name`` (its legacy form, still routed)."""
    gateway = (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\n"
        "metadata: {name: my-gateway, namespace: istio-system}\nspec:\n"
        "  servers: [{port: {number: 8080, name: grpc, protocol: GRPC}, hosts: ['*']}]\n"
    )
    for name in ("my-gateway.istio-system", "my-gateway.istio-system.svc.cluster.local"):
        config = config_from_yaml(
            gateway + "---\n" + vs(ROUTE, spec=f"  gateways: [{name}]\n"), source="istio.yaml"
        )
        (bound,) = config.virtual_services_for("inference")
        assert bound.gateways == ("istio-system/my-gateway",)
        clusters = ClusterMap(
            config,
            EndpointsSnapshot.from_instances(instances()),
            LoadTracker(),
            lambda: 0.0,
            view=ingress_view(port=8080),
        )
        assert decide(clusters, RequestInfo(INFER), random.Random(1)).route == (
            "VirtualService/inference http[0]"
        )


def decide_with(config: MeshConfig, request: RequestInfo) -> RouteDecision:
    clusters = ClusterMap(
        config, EndpointsSnapshot.from_instances(instances()), LoadTracker(), lambda: 0.0
    )
    return decide(clusters, request, random.Random(1))


def match_port() -> None:
    """VirtualService docs: ``match: [{port: 8001}]`` selects calls that arrived on 8001."""
    config = config_from_yaml(
        vs(
            "    - match: [{port: 8001}]\n"
            "      route: [{destination: {host: inference, subset: v2}}]\n"
            "    - route: [{destination: {host: inference, subset: v1}}]\n"
        )
        + "---\n"
        + VERSIONS,
        source="istio.yaml",
    )
    assert decide_with(config, RequestInfo(INFER, port=8001)).subset == "v2"
    assert decide_with(config, RequestInfo(INFER, port=8443)).subset == "v1"
    assert decide_with(config, RequestInfo(INFER)).subset == "v1"  # port unknown


def use_source_ip() -> None:
    """DestinationRule docs: ``consistentHash: {useSourceIp: true}`` — a client's calls
    stay on one endpoint; different clients spread."""
    config = config_from_yaml(
        dr("  trafficPolicy:\n    loadBalancer: {consistentHash: {useSourceIp: true}}\n"),
        source="istio.yaml",
    )

    def endpoint(ip: str, seed: int = 1) -> str:
        request = RequestInfo(INFER, source_ip=ip)
        clusters = ClusterMap(
            config, EndpointsSnapshot.from_instances(instances()), LoadTracker(), lambda: 0.0
        )
        decision = decide(clusters, request, random.Random(seed))
        assert decision.hash_key is not None and decision.hash_key.key == ip
        return decision.candidates[0].address

    assert len({endpoint("10.9.0.1", seed) for seed in range(20)}) == 1
    assert len({endpoint(f"10.9.0.{i}") for i in range(40)}) > 1


WORKS: dict[str, Callable[[], None]] = {
    f.__name__: f
    for f in (
        match_port,
        use_source_ip,
        headers_route_to_a_subset,
        weights_are_relative,
        regexes_are_re2,
        ignore_uri_case_on_prefix,
        no_matching_rule_is_no_route,
        retries_without_attempts_disable_retries,
        retry_on_takes_numeric_codes,
        upper_case_header_edits,
        export_to_everyone_and_own_namespace,
        fqdn_hosts_from_another_namespace,
        simple_unspecified_is_the_default,
        zero_means_the_default,
        connection_pool_limits,
        connect_timeout,
        legacy_gateway_names,
        gateway_in_istio_system_with_servers_sharing_a_port,
        ring_size_is_the_whole_ring,
        kubectl_exports_are_accepted,
        numeric_port_level_mtls,
        service_accounts,
        remote_ip_blocks,
        path_templates,
        hosts_ignore_case,
        ingress_policies_in_istio_system,
        mesh_wide_strict_mtls_in_istio_system,
        ingress_jwt_in_istio_system,
        max_ejection_percent_zero_is_the_default,
    )
}


@pytest.mark.parametrize("example", list(WORKS))
def test_istio_example_behaves_as_documented(example: str) -> None:
    WORKS[example]()


# --- refused, naming the field ------------------------------------------------------------

REFUSED: list[tuple[str, str, str]] = [
    # (Istio example, field path in the message, what the message says)
    (vs(ROUTE, spec="  gateways: [ingress]\n"), "spec.gateways[0]", "names no Gateway"),
    (vs(ROUTE, spec="  gateways: [ops/ingress]\n"), "spec.gateways[0]", "names no Gateway"),
    (vs(ROUTE, spec="  gateways: []\n"), "spec.gateways", "at least one gateway"),
    (
        # Istio indexes a VirtualService by its own gateways (unset: mesh) alone.
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\n"
        "spec:\n  servers: [{port: {number: 8080, protocol: GRPC}, hosts: ['*']}]\n---\n"
        + vs(
            "    - match: [{gateways: [ingress]}]\n      route: [{destination: {host: inference}}]\n"
        ),
        "spec.http[0].match[0].gateways[0]",
        "is not among the VirtualService's gateways",
    ),
    (
        vs(ROUTE).replace("hosts: [inference]", "hosts: ['*']"),
        "spec.hosts[0]",
        "wildcard host '*' is an Istio form meshserve does not support",
    ),
    (
        vs(ROUTE).replace("hosts: [inference]", "hosts: ['*.example.com']"),
        "spec.hosts[0]",
        "meshserve does not support",
    ),
    (
        # Istio's ingress task: the VirtualService names the public host it serves.
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: httpbin}\n"
        "spec:\n  selector: {istio: ingressgateway}\n  servers: [{port: {number: 80,"
        " name: http, protocol: HTTP}, hosts: [httpbin.example.com]}]\n---\n"
        + vs(ROUTE, spec="  gateways: [httpbin]\n").replace(
            "hosts: [inference]", "hosts: [httpbin.example.com]"
        ),
        "spec.hosts[0]",
        "at a Gateway a call is routed by the mesh service it is for",
    ),
    (vs(ROUTE, spec="  exportTo: ['~']\n"), "spec.exportTo", "hides the resource"),
    (vs(ROUTE, spec="  exportTo: [ops]\n"), "spec.exportTo", "hides the resource"),
    (vs(ROUTE, metadata="  namespace: ops\n"), "spec.hosts[0]", "short host 'inference'"),
    (
        vs("    - route: [{destination: {host: inference, port: {number: 9080}}}]\n"),
        "spec.http[0].route[0].destination.port",
        UNSUPPORTED,
    ),
    (
        vs(ROUTE + "      mirror: {host: inference, port: {number: 9080}}\n"),
        "spec.http[0].mirror.port",
        UNSUPPORTED,
    ),
    (
        vs(
            "    - match: [{uri: {regex: '/inference.*'}, ignoreUriCase: true}]\n"
            "      route: [{destination: {host: inference}}]\n"
        ),
        "spec.http[0].match[0].ignoreUriCase",
        "exact and prefix only",
    ),
    (
        vs("    - match: [{port: 70000}]\n      route: [{destination: {host: inference}}]\n"),
        "spec.http[0].match[0].port",
        "must be an integer in [0, 65535]",
    ),
    (
        vs(ROUTE + "      retries: {perTryTimeout: 2s}\n"),
        "spec.http[0].retries.perTryTimeout",
        "retries are disabled",
    ),
    (
        vs(ROUTE + "      retries: {attempts: 0, retryOn: 5xx}\n"),
        "spec.http[0].retries.retryOn",
        "retries are disabled",
    ),
    (
        vs(ROUTE + "      retries: {attempts: 2, retryOn: '5xx,999'}\n"),
        "spec.http[0].retries.retryOn",
        "not an HTTP status",
    ),
    (
        vs(
            "    - match: [{headers: {x-a: {regex: '(?=a)a'}}}]\n"
            "      route: [{destination: {host: inference}}]\n"
        ),
        "spec.http[0].match[0].headers.x-a.regex",
        "not an RE2 regular expression",
    ),
    (
        vs(
            "    - match: [{uri: {regex: '(a)\\1'}}]\n"
            "      route: [{destination: {host: inference}}]\n"
        ),
        "spec.http[0].match[0].uri.regex",
        "not an RE2 regular expression",
    ),
    (
        vs(
            "    - route:\n      - {destination: {host: inference}, weight: 0}\n"
            "      - {destination: {host: inference}}\n"
        ),
        "spec.http[0].route",
        "sum to 0",
    ),
    (
        dr("  trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: -1}}}\n"),
        "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
        "must be an integer in [0, 4294967295], got -1",
    ),
    (
        dr("  trafficPolicy: {connectionPool: {http: {maxRetries: 1.5}}}\n"),
        "spec.trafficPolicy.connectionPool.http.maxRetries",
        "must be an integer",
    ),
    (
        dr("  trafficPolicy: {connectionPool: {tcp: {maxConnections: 4294967296}}}\n"),
        "spec.trafficPolicy.connectionPool.tcp.maxConnections",
        "must be an integer in [0, 4294967295]",
    ),
    (
        dr(
            "  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 7200s, interval: 75s}}}}\n"
        ),
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {connectionPool: {tcp: {maxConnectionDuration: 1h}}}\n"),
        "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {connectionPool: {tcp: {idleTimeout: 1h}}}\n"),
        "spec.trafficPolicy.connectionPool.tcp.idleTimeout",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {connectionPool: {http: {idleTimeout: 10s}}}\n"),
        "spec.trafficPolicy.connectionPool.http.idleTimeout",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}\n"),
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {connectionPool: {http: {useClientProtocol: true}}}\n"),
        "spec.trafficPolicy.connectionPool.http.useClientProtocol",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {connectionPool: {http: {maxConcurrentStreams: 100}}}\n"),
        "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 0s}}}\n"),
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        "must be a positive duration",
    ),
    (
        dr("  trafficPolicy: {connectionPool: {tcp: {maxConnections: '10'}}}\n"),
        "spec.trafficPolicy.connectionPool.tcp.maxConnections",
        "got a string",
    ),
    (dr("  exportTo: ['.']\n", metadata="  namespace: ops\n"), "spec.host", "short host"),
    (
        dr("  trafficPolicy: {tls: {mode: ISTIO_MUTUAL, sni: a.example.com}}\n"),
        "spec.trafficPolicy.tls.sni",
        "applies to modes SIMPLE and MUTUAL only",
    ),
    (
        dr("  trafficPolicy: {tls: {mode: MUTUAL, caCertificates: /ca.pem}}\n"),
        "spec.trafficPolicy.tls.clientCertificate",
        "is required with mode MUTUAL",
    ),
    (
        dr("  trafficPolicy: {tls: {mode: SIMPLE, credentialName: secret}}\n"),
        "spec.trafficPolicy.tls.credentialName",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {portLevelSettings: [{port: {number: 80}}]}\n"),
        "portLevelSettings",
        "has no service port",
    ),
    (
        dr(
            "  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true,"
            " httpHeaderName: x}}}\n"
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp",
        "not both",
    ),
    (
        dr(
            "  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x,"
            " maglev: {tableSize: 65536}}}}\n"
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "must be a prime number",
    ),
    (
        dr(
            "  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN,"
            " localityLbSetting: {failoverPriority: [topology.istio.io/network]}}}\n"
        ),
        "spec.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority",
        UNSUPPORTED,
    ),
    (
        dr("  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}\n"),
        "spec.trafficPolicy.loadBalancer.simple",
        "meshserve does not support",
    ),
    (
        authz("  action: CUSTOM\n  provider: {name: my-ext-authz}\n  rules: [{}]\n"),
        "spec.action",
        "meshserve does not support",
    ),
    (
        authz("  rules: [{when: [{key: destination.ip, values: [10.0.0.1]}]}]\n"),
        "spec.rules[0].when[0].key",
        "meshserve does not support",
    ),
    (
        authz("  rules: [{to: [{operation: {paths: ['/a/{**}/{*}']}}]}]\n"),
        "spec.rules[0].to[0].operation.paths[0]",
        "last operator",
    ),
    (
        authz("  rules: [{to: [{operation: {paths: ['/a/{name}']}}]}]\n"),
        "spec.rules[0].to[0].operation.paths[0]",
        "is not {*} or {**}",
    ),
    (
        authz("  rules: [{from: [{source: {serviceAccounts: ['gateway']}}]}]\n"),
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "<namespace>/<service account>",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec:\n"
        "  servers: []\n",
        "spec.servers",
        "at least one server",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec:\n"
        "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: ['*'],"
        " tls: {mode: SIMPLE, credentialName: cert}}]\n",
        "spec.servers[0].tls.mode",
        UNSUPPORTED,
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec:\n"
        "  servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: ['*']}]\n",
        "spec.servers[0].port.protocol",
        "gRPC over HTTP/2",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec:\n"
        "  servers: [{port: {number: 80, protocol: GRPC}, hosts: ['*'], bind: 0.0.0.0}]\n",
        "spec.servers[0].bind",
        UNSUPPORTED,
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec:\n"
        "  servers: [{port: {number: 80, protocol: GRPC}, hosts: ['*'],"
        " defaultEndpoint: 127.0.0.1:8080}]\n",
        "spec.servers[0].defaultEndpoint",
        UNSUPPORTED,
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec:\n"
        "  servers: [{port: {number: 80, protocol: GRPC}, hosts: []}]\n",
        "spec.servers[0].hosts",
        "at least one host",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\nspec:\n"
        "  servers: [{port: {number: 80, protocol: GRPC}, hosts: ['a b/x']}]\n",
        "spec.servers[0].hosts[0]",
        "namespace part",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\n"
        "spec: {hosts: [x.example.com], ports: [{number: 80, name: grpc}]}\n",
        "spec.resolution",
        "NONE (Istio's default) is a resolution meshserve does not support",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt}\nspec:\n  jwtRules: [{issuer: a, jwksUri: 'file:///k',"
        " fromParams: [access_token]}]\n",
        "spec.jwtRules[0].fromParams",
        UNSUPPORTED,
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt}\nspec:\n  jwtRules: [{issuer: https://example.com}]\n",
        "spec.jwtRules[0]",
        "OpenID Connect discovery",
    ),
]


@pytest.mark.parametrize(
    ("text", "path", "says"), REFUSED, ids=[f"{p} ({s[:30]})" for _, p, s in REFUSED]
)
def test_istio_example_is_refused_naming_the_field(text: str, path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_yaml(text, source="istio.yaml")
    message = str(caught.value)
    assert message.startswith("istio.yaml: ")
    assert f": {path}: " in message and says in message, message
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
