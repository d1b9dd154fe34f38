"""ServiceEntry: Istio's documented examples, routed through the routing core or refused by name."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.config.fields import ConfigError
from mesh.config.loader import load_path
from mesh.config.service_entry import ServiceEntry
from mesh.config.snapshot import MeshConfig, config_from_path, config_from_yaml
from mesh.routing.admission import admission_problems
from mesh.routing.decision import RequestInfo, RouteDecision, decide
from mesh.routing.discovery import StaticInstance

INFER = "/inference.GRPCInferenceService/ModelInfer"


def se(spec: str, name: str = "external-models") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata:\n  name: {name}\nspec:\n{spec}"
    )


STATIC = se(
    "  hosts: [models.example.com]\n"
    "  location: MESH_EXTERNAL\n"
    "  ports: [{number: 8001, name: grpc, protocol: GRPC}]\n"
    "  resolution: STATIC\n"
    "  endpoints:\n"
    "    - {address: 10.1.0.1, labels: {version: v1}}\n"
    "    - {address: 10.1.0.2, labels: {version: v2}, ports: {grpc: 9001}}\n"
)
#: Send the mesh's inference calls with ``x-external: yes`` to the external host.
TO_EXTERNAL = (
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: inference}\n"
    "spec:\n  hosts: [inference]\n  http:\n"
    "    - match: [{headers: {x-external: {exact: 'yes'}}}]\n"
    "      route: [{destination: {host: models.example.com, subset: v2}}]\n"
    "      retries: {attempts: 2, retryOn: unavailable}\n"
    "    - route: [{destination: {host: inference}}]\n"
)
SUBSETS = (
    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: external}\n"
    "spec:\n  host: models.example.com\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n"
    "  subsets:\n    - {name: v1, labels: {version: v1}}\n    - {name: v2, labels: {version: v2}}\n"
)


def registered() -> EndpointsSnapshot:
    return EndpointsSnapshot.from_instances([StaticInstance("inference", "w0", "10.0.0.1:8001")])


def route(
    config: MeshConfig, headers: dict[str, str] | None = None, authority: str = ""
) -> RouteDecision:
    clusters = ClusterMap(config, registered(), LoadTracker(), lambda: 0.0)
    request = RequestInfo(INFER, tuple((headers or {}).items()), authority=authority)
    return decide(clusters, request, random.Random(1))


def test_static_endpoints_are_parsed_with_ports_labels_and_weights() -> None:
    config = config_from_yaml(STATIC, source="se.yaml")
    entry = config.service_entry("models.example.com")
    assert isinstance(entry, ServiceEntry)
    assert [(e.address, dict(e.labels)) for e in entry.endpoints] == [
        ("10.1.0.1:8001", {"version": "v1"}),
        ("10.1.0.2:9001", {"version": "v2"}),
    ]
    assert entry.external and entry.resolution == "STATIC"


def test_a_rule_routes_to_the_external_host_behind_subsets_and_retries() -> None:
    config = config_from_yaml("---\n".join([STATIC, TO_EXTERNAL, SUBSETS]), source="se.yaml")
    external = route(config, {"x-external": "yes"})
    assert (external.host, external.subset) == ("models.example.com", "v2")
    assert [e.address for e in external.candidates] == ["10.1.0.2:9001"]
    assert external.retries.attempts == 2
    mesh = route(config)
    assert mesh.host == "inference"
    assert [e.address for e in mesh.candidates] == ["10.0.0.1:8001"]


def test_the_authority_names_an_external_host() -> None:
    """A client that dials ``models.example.com`` through the gateway reaches its entry."""
    config = config_from_yaml(STATIC, source="se.yaml")
    decision = route(config, authority="models.example.com:443")
    assert decision.host == "models.example.com"
    assert {e.address for e in decision.candidates} == {"10.1.0.1:8001", "10.1.0.2:9001"}


def test_dns_without_endpoints_resolves_the_host_itself() -> None:
    """Istio: DNS resolution with no endpoints connects to the hosts, at the target port."""
    config = config_from_yaml(
        se(
            "  hosts: [api.example.com]\n"
            "  ports: [{number: 443, name: grpc, targetPort: 8443}]\n"
            "  resolution: DNS\n"
        ),
        source="se.yaml",
    )
    decision = route(config, authority="api.example.com")
    assert [e.address for e in decision.candidates] == ["api.example.com:8443"]


def test_dns_endpoints_may_be_hostnames() -> None:
    config = config_from_yaml(
        se(
            "  hosts: [models.example.com]\n  ports: [{number: 8001, name: grpc}]\n"
            "  resolution: DNS\n  endpoints: [{address: localhost}, {address: b.example.net}]\n"
        ),
        source="se.yaml",
    )
    assert {e.address for e in route(config, authority="models.example.com").candidates} == {
        "localhost:8001",
        "b.example.net:8001",
    }


def test_a_mesh_host_merges_registry_and_entry_endpoints() -> None:
    """A ServiceEntry for a mesh service adds its endpoints to the registered ones."""
    config = config_from_yaml(
        se(
            "  hosts: [inference.meshserve.svc.cluster.local]\n  location: MESH_INTERNAL\n"
            "  ports: [{number: 8001, name: grpc}]\n  resolution: STATIC\n"
            "  endpoints: [{address: 10.9.0.9}]\n"
        ),
        source="se.yaml",
    )
    assert {e.address for e in route(config).candidates} == {"10.0.0.1:8001", "10.9.0.9:8001"}


def test_admission_counts_entry_endpoints_as_instances() -> None:
    config = config_from_yaml("---\n".join([STATIC, TO_EXTERNAL, SUBSETS]), source="se.yaml")
    assert admission_problems(config, config, registered()) == []


def test_an_external_host_needs_a_service_entry() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_yaml(TO_EXTERNAL, source="vs.yaml")
    assert (
        "spec.http[0].route[0].destination.host: host 'models.example.com' is not a mesh "
        "service" in str(caught.value)
    )
    assert "declare it with a ServiceEntry" in str(caught.value)


REFUSED = [
    (
        se("  hosts: ['*.example.com']\n  ports: [{number: 1, name: g}]\n"),
        "spec.hosts[0]",
        "wildcard",
    ),
    (
        se("  hosts: [a.example.com]\n  ports: [{number: 1, name: g}]\n"),
        "spec.resolution",
        "NONE (Istio's default)",
    ),
    (
        se("  hosts: [a.example.com]\n  ports: [{number: 1, name: g}]\n  resolution: STATIC\n"),
        "spec.endpoints",
        "needs at least one endpoint",
    ),
    (
        se(
            "  hosts: [a.example.com]\n  resolution: DNS\n"
            "  ports: [{number: 1, name: g}, {number: 2, name: h}]\n"
        ),
        "spec.ports",
        "exactly one port",
    ),
    (
        se(
            "  hosts: [a.example.com]\n  resolution: DNS\n  ports: [{number: 80, name: h, protocol: HTTP}]\n"
        ),
        "spec.ports[0].protocol",
        "meshserve relays gRPC",
    ),
    (
        se(
            "  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 1, name: g}]\n"
            "  endpoints: [{address: a.example.net}]\n"
        ),
        "spec.endpoints[0].address",
        "needs an IP address",
    ),
    (
        se(
            "  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 1, name: g}]\n"
            "  endpoints: [{address: 10.0.0.1, ports: {http: 80}}]\n"
        ),
        "spec.endpoints[0].ports.http",
        "names no port",
    ),
    (
        se(
            "  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 1, name: g}]\n"
            "  endpoints: [{address: 10.0.0.1, locality: us-east/a}]\n"
        ),
        "spec.endpoints[0].locality",
        "does not support",
    ),
    (
        se(
            "  hosts: [a.example.com]\n  addresses: [192.168.0.1]\n  resolution: DNS\n"
            "  ports: [{number: 1, name: g}]\n"
        ),
        "spec.addresses",
        "does not support",
    ),
    (
        "---\n".join(
            [
                se(
                    "  hosts: [a.example.com]\n  resolution: DNS\n  ports: [{number: 1, name: g}]\n"
                ),
                se(
                    "  hosts: [a.example.com]\n  resolution: DNS\n  ports: [{number: 2, name: g}]\n",
                    name="again",
                ),
            ]
        ),
        "spec.hosts[0]",
        "already declared by ServiceEntry/external-models",
    ),
]


@pytest.mark.parametrize(("text", "path", "says"), REFUSED, ids=[p for _, p, _ in REFUSED])
def test_refused_naming_the_field(text: str, path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_yaml(text, source="se.yaml")
    message = str(caught.value)
    assert f": {path}: " in message and says in message, message


# --- DestinationRule tls and portLevelSettings, through the cluster map ----------------------


def clusters(*documents: str) -> ClusterMap:
    return ClusterMap(
        config_from_yaml("---\n".join(documents), source="dr.yaml"),
        registered(),
        LoadTracker(),
        lambda: 0.0,
    )


def dr(policy: str, subsets: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ext}\n"
        f"spec:\n  host: models.example.com\n  trafficPolicy:\n{policy}{subsets}"
    )


def test_tls_defaults_follow_istio_auto_mtls() -> None:
    """No ``tls``: the mesh's mTLS to registered services, plaintext to MESH_EXTERNAL."""
    internal = STATIC.replace("MESH_EXTERNAL", "MESH_INTERNAL")
    assert clusters(STATIC).cluster("models.example.com").tls.mode == "DISABLE"
    assert clusters(internal).cluster("models.example.com").tls.mode == "ISTIO_MUTUAL"
    assert clusters(STATIC).cluster("inference").tls.mode == "ISTIO_MUTUAL"


@pytest.mark.parametrize(
    ("tls", "mode", "sni"),
    [
        ("{mode: DISABLE}", "DISABLE", None),
        ("{}", "DISABLE", None),  # Istio's enum default
        ("{mode: SIMPLE, sni: api.example.com}", "SIMPLE", "api.example.com"),
        ("{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}", "MUTUAL", None),
        ("{mode: ISTIO_MUTUAL}", "ISTIO_MUTUAL", None),
    ],
)
def test_tls_modes_are_read(tls: str, mode: str, sni: str | None) -> None:
    cluster = clusters(STATIC, dr(f"    tls: {tls}\n")).cluster("models.example.com")
    assert (cluster.tls.mode, cluster.tls.sni) == (mode, sni)


def test_port_level_settings_apply_at_the_entry_port_in_istio_order() -> None:
    """Host, host's port level, subset, subset's port level — per block."""
    policy = (
        "    loadBalancer: {simple: RANDOM}\n"
        "    portLevelSettings:\n"
        "      - port: {number: 8001}\n"
        "        tls: {mode: SIMPLE}\n"
        "        loadBalancer: {simple: ROUND_ROBIN}\n"
        "      - port: {number: 9999}\n"
        "        tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}\n"
    )
    subsets = (
        "  subsets:\n"
        "    - name: v1\n      labels: {version: v1}\n"
        "      trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n"
        "    - name: v2\n      labels: {version: v2}\n"
        "      trafficPolicy:\n        portLevelSettings:\n"
        "          - {port: {number: 8001}, tls: {mode: DISABLE}}\n"
    )
    found = clusters(STATIC, dr(policy, subsets))
    host = found.cluster("models.example.com")
    assert (host.tls.mode, host.policy.load_balancer.simple) == ("SIMPLE", "ROUND_ROBIN")
    v1 = found.cluster("models.example.com", "v1")
    # The subset's loadBalancer overrides the host's port level; its tls is the port's.
    assert (v1.tls.mode, v1.policy.load_balancer.simple) == ("SIMPLE", "LEAST_REQUEST")
    v2 = found.cluster("models.example.com", "v2")
    assert (v2.tls.mode, v2.policy.load_balancer.simple) == ("DISABLE", "ROUND_ROBIN")
    # Port 9999 is not the entry's: its settings never apply.
    assert host.tls.mode != "MUTUAL"


def test_the_external_triton_example_routes_over_the_sample_config() -> None:
    repo = Path(__file__).resolve().parents[2]
    config = config_from_path(repo / "config").merged(
        load_path(repo / "config" / "examples" / "external-triton.yaml"),
        version=2,
        source="example",
    )
    clusters = ClusterMap(config, registered(), LoadTracker(), lambda: 0.0)
    external = decide(clusters, RequestInfo(INFER, (("x-backend", "external"),)), random.Random(1))
    assert [e.address for e in external.candidates] == ["triton.models.example.com:8001"]
    assert clusters.cluster(external.host).tls.mode == "SIMPLE"
    assert decide(clusters, RequestInfo(INFER), random.Random(1)).host == "inference"
