"""Config parsing: Istio defaults, every error naming file/resource/field, cross-references."""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import pytest

from mesh.config.destination_rule import DestinationRule, Extensions
from mesh.config.fields import ConfigError, parse_duration
from mesh.config.hosts import normalise_host
from mesh.config.loader import load_path, parse_yaml
from mesh.config.retries import DEFAULT_RETRY_ON
from mesh.config.security import AuthorizationPolicy, PeerAuthentication
from mesh.config.snapshot import config_from_path, config_from_yaml
from mesh.config.virtual_service import VirtualService

REPO = Path(__file__).resolve().parents[2]


def vs_yaml(http: str, name: str = "inference", hosts: str = "[inference]") -> str:
    body = textwrap.indent(textwrap.dedent(http).strip(), "    ")
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata:\n  name: {name}\nspec:\n  hosts: {hosts}\n  http:\n{body}\n"
    )


def dr_yaml(spec: str, annotations: str = "", name: str = "inference") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    ann = ""
    if annotations:
        ann = (
            "  annotations:\n"
            + textwrap.indent(textwrap.dedent(annotations).strip(), "    ")
            + "\n"
        )
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata:\n  name: {name}\n{ann}spec:\n{body}\n"
    )


def one(text: str) -> object:
    (document,) = parse_yaml(text, "config/test.yaml")
    return document.resource


def test_sample_config_directory_loads_and_cross_validates() -> None:
    config = config_from_path(REPO / "config")
    assert sorted(config.virtual_services) == ["data", "inference", "training"]
    rule = config.destination_rule("inference")
    assert rule is not None and rule.traffic_policy.load_balancer.consistent_hash is not None
    assert rule.extensions.hash_fields == ("model_name", "model_version")
    # An example is applied over the running config, whose Gateway its rules name.
    canary = config.merged(
        load_path(REPO / "config" / "examples" / "canary-90-10.yaml"), version=2, source="canary"
    )
    weights = [d.weight for d in canary.virtual_services["inference"][0].http[1].route]
    assert weights == [90, 10]


def test_virtual_service_defaults_follow_istio() -> None:
    vs = one(vs_yaml("- route:\n  - destination: {host: inference}"))
    assert isinstance(vs, VirtualService)
    rule = vs.http[0]
    assert rule.route[0].weight == 100
    assert rule.timeout is None
    # Istio retries twice on connect-failure,refused-stream,unavailable,cancelled,... by default.
    assert rule.retries.attempts == 2
    assert rule.retries.retry_on == DEFAULT_RETRY_ON
    assert rule.retries.should_retry(grpc.StatusCode.UNAVAILABLE)
    assert not rule.retries.should_retry(grpc.StatusCode.INVALID_ARGUMENT)
    assert rule.retries.should_retry(grpc.StatusCode.UNKNOWN, connection_failure=True)
    assert vs.metadata.namespace == "meshserve"


def test_virtual_service_full_rule_parses() -> None:
    vs = one(
        vs_yaml(
            """
            - name: v2
              match:
                - uri: {regex: "/inference\\\\.GRPCInferenceService/Model(Infer|Ready)"}
                  headers:
                    x-model-version: {exact: "2"}
                    x-canary: {}
                  withoutHeaders:
                    x-debug: {prefix: "1"}
              timeout: 1.5s
              retries: {attempts: 3, perTryTimeout: 100ms, retryOn: "unavailable,deadline-exceeded"}
              fault:
                delay: {fixedDelay: 50ms, percentage: {value: 12.5}}
                abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 1}}
              mirror: {host: inference.meshserve.svc.cluster.local}
              mirrorPercentage: {value: 5}
              headers:
                request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
              route:
                - destination: {host: inference}
                  weight: 75
                - destination: {host: inference.meshserve}
                  weight: 25
                  headers: {request: {set: {x-model-version: "2"}}}
            """
        )
    )
    assert isinstance(vs, VirtualService)
    rule = vs.http[0]
    match = rule.matches[0]
    assert match.uri is not None and match.uri.kind == "regex"
    assert dict(match.headers)["x-canary"].kind == "present"
    assert rule.timeout == 1.5
    assert rule.retries.attempts == 3 and rule.retries.per_try_timeout == pytest.approx(0.1)
    assert rule.retries.codes == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert rule.fault is not None and rule.fault.delay is not None and rule.fault.abort is not None
    assert (
        rule.fault.delay.fixed_delay == pytest.approx(0.05) and rule.fault.delay.percentage == 12.5
    )
    assert rule.fault.abort.status is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rule.mirror is not None and rule.mirror.host == "inference"
    assert rule.mirror_percentage == 5
    assert rule.headers.request.set == (("x-a", "1"),)
    assert rule.headers.request.remove == ("x-c",)
    assert [d.destination.host for d in rule.route] == ["inference", "inference"]


def test_model_match_is_a_meshserve_extension_of_a_match_entry() -> None:
    vs = one(
        vs_yaml(
            """
            - match:
                - uri: {prefix: /inference.GRPCInferenceService/ModelInfer}
                  x-meshserve: {model: {regex: "demo|resnet-[0-9]+"}}
              route: [{destination: {host: inference}}]
            - route: [{destination: {host: inference}}]
            """
        )
    )
    assert isinstance(vs, VirtualService) and vs.matches_model
    model = vs.http[0].matches[0].model
    assert model is not None and model.kind == "regex" and model.value == "demo|resnet-[0-9]+"
    assert vs.http[1].matches == ()
    plain = one(vs_yaml(ROUTE))
    assert isinstance(plain, VirtualService) and not plain.matches_model


def test_destination_rule_defaults_follow_istio() -> None:
    dr = one(dr_yaml("host: inference\ntrafficPolicy:\n  outlierDetection: {}"))
    assert isinstance(dr, DestinationRule)
    assert dr.traffic_policy.load_balancer.simple == "LEAST_REQUEST"
    od = dr.traffic_policy.outlier_detection
    assert od is not None
    assert (od.consecutive_5xx_errors, od.consecutive_gateway_errors) == (5, 0)
    assert (od.interval, od.base_ejection_time) == (10.0, 30.0)
    assert (od.max_ejection_percent, od.min_health_percent) == (10, 0)
    assert dr.traffic_policy.connection_pool.http2_max_requests == 2**32 - 1
    assert dr.extensions == Extensions()
    plain = one(dr_yaml("host: data"))
    assert isinstance(plain, DestinationRule)
    assert plain.traffic_policy.outlier_detection is None  # absent block: detection off


def test_subset_policy_overrides_per_block() -> None:
    dr = one(
        dr_yaml(
            """
            host: inference
            trafficPolicy:
              loadBalancer: {consistentHash: {httpHeaderName: X-Model-Version}}
              outlierDetection: {consecutive5xxErrors: 3}
            subsets:
              - name: gpu
                labels: {accelerator: gpu}
                trafficPolicy:
                  loadBalancer: {simple: ROUND_ROBIN}
              - name: cpu
                labels: {accelerator: cpu}
            """
        )
    )
    assert isinstance(dr, DestinationRule)
    gpu = dr.policy_for("gpu")
    assert gpu.load_balancer.simple == "ROUND_ROBIN"
    assert gpu.outlier_detection is not None and gpu.outlier_detection.consecutive_5xx_errors == 3
    cpu = dr.policy_for("cpu")
    assert cpu.load_balancer.consistent_hash is not None
    assert cpu.load_balancer.consistent_hash.http_header_name == "x-model-version"
    assert cpu.load_balancer.consistent_hash.minimum_ring_size == 1024
    assert dr.subset("gpu") is not None and dict(dr.subset("gpu").labels) == {"accelerator": "gpu"}  # type: ignore[union-attr]


def test_extension_annotations() -> None:
    dr = one(
        dr_yaml(
            "host: inference\ntrafficPolicy:\n  loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 64}}}",
            annotations="""
            meshserve.io/hash-fields: "model_name,model_version"
            meshserve.io/bounded-load: "1.5"
            meshserve.io/hot-key-replicas: "3"
            meshserve.io/hot-key-threshold: "10"
            meshserve.io/cold-spill: "1"
            other.io/kept: "for others"
            """,
        )
    )
    assert isinstance(dr, DestinationRule)
    assert dr.extensions == Extensions(("model_name", "model_version"), 1.5, 3, 10, 1.0)
    off = one(
        dr_yaml(
            "host: inference\ntrafficPolicy:\n  loadBalancer: {consistentHash: {httpHeaderName: x-k}}",
            annotations='meshserve.io/bounded-load: "off"',
        )
    )
    assert isinstance(off, DestinationRule) and off.extensions.bounded_load is None


def test_security_resources_parse() -> None:
    docs = parse_yaml(
        textwrap.dedent(
            """
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: strict}
            spec:
              selector: {matchLabels: {app: inference}}
              mtls: {mode: STRICT}
              portLevelMtls: {"8080": {mode: PERMISSIVE}}
            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: infer-only}
            spec:
              action: ALLOW
              rules:
                - from: [{source: {principals: ["spiffe://meshserve/ns/meshserve/sa/gateway"], ipBlocks: ["10.0.0.0/8"]}}]
                  to: [{operation: {paths: ["/inference.GRPCInferenceService/*"], ports: ["8001"]}}]
                  when: [{key: "request.headers[x-tenant]", values: [a, b]}]
            """
        ),
        "config/sec.yaml",
    )
    peer, authz = (d.resource for d in docs)
    assert isinstance(peer, PeerAuthentication)
    assert peer.mode == "STRICT" and peer.port_modes == ((8080, "PERMISSIVE"),)
    assert isinstance(authz, AuthorizationPolicy)
    assert authz.action == "ALLOW"
    assert authz.rules[0].operations[0].paths == ("/inference.GRPCInferenceService/*",)
    assert authz.rules[0].conditions[0].values == ("a", "b")


ROUTE = "- route:\n  - destination: {host: inference}"

ERRORS: list[tuple[str, str]] = [
    (
        vs_yaml(
            """
            - route:
              - destination: {host: inference}
                weight: 90
            - route:
              - destination: {host: inference}
                weight: -5
            """
        ),
        "config/test.yaml: VirtualService/inference: spec.http[1].route[0].weight: "
        "must be an integer in [0, 2147483647], got -5",
    ),
    (
        vs_yaml(
            """
            - route:
              - destination: {host: inference}
                weight: 0
              - destination: {host: inference}
            """
        ),
        "spec.http[0].route: destination weights sum to 0",
    ),
    (vs_yaml(ROUTE.replace("route:", "rout:")), "spec.http[0].rout: unknown field"),
    (
        vs_yaml(ROUTE + "\n  redirect: {uri: /x}"),
        "spec.http[0].redirect: is an Istio field that meshserve does not support",
    ),
    (
        vs_yaml(ROUTE + "\n  timeout: 5"),
        'spec.http[0].timeout: must be a duration string such as "1.5s"',
    ),
    (vs_yaml(ROUTE + "\n  timeout: 5 seconds"), "spec.http[0].timeout: must be a duration such as"),
    (
        vs_yaml(ROUTE + "\n  retries: {attempts: 1, retryOn: 'unavailable,teapot'}"),
        "spec.http[0].retries.retryOn: unknown retry condition 'teapot'",
    ),
    (
        vs_yaml(ROUTE + "\n  retries: {attempts: -1}"),
        "spec.http[0].retries.attempts: must be an integer in [0, 2147483647], got -1",
    ),
    (
        vs_yaml(ROUTE + "\n  fault: {abort: {grpcStatus: BROKEN}}"),
        "spec.http[0].fault.abort.grpcStatus: must be one of CANCELLED",
    ),
    (
        vs_yaml(ROUTE + "\n  fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}"),
        "spec.http[0].fault.delay.percentage.value: must be a number in [0, 100], got 101",
    ),
    (vs_yaml(ROUTE + "\n  fault: {}"), "spec.http[0].fault: must have a delay or an abort"),
    (
        vs_yaml(ROUTE + "\n  mirrorPercentage: {value: 5}"),
        "spec.http[0].mirrorPercentage: is set but there is no mirror",
    ),
    (
        vs_yaml(
            "- match: [{uri: {exact: /a, prefix: /b}}]\n  route:\n  - destination: {host: inference}"
        ),
        "spec.http[0].match[0].uri: must have exactly one of exact, prefix or regex",
    ),
    (
        vs_yaml(
            "- match: [{uri: {regex: '(unclosed'}}]\n  route:\n  - destination: {host: inference}"
        ),
        "spec.http[0].match[0].uri.regex: not an RE2 regular expression",
    ),
    (
        vs_yaml(
            "- match: [{headers: {X-Upper: {exact: a}}}]\n  route:\n  - destination: {host: inference}"
        ),
        "spec.http[0].match[0].headers.X-Upper: header names must be lower-case",
    ),
    (
        vs_yaml(ROUTE, hosts="[inference.other.svc.cluster.local]"),
        "spec.hosts[0]: host 'inference.other.svc.cluster.local' is not a mesh service",
    ),
    (vs_yaml("- route: []"), "spec.http[0].route: must have at least one destination"),
    (
        vs_yaml("- route:\n  - destination: {subset: v1}"),
        "spec.http[0].route[0].destination.host: is required",
    ),
    (
        dr_yaml("host: inference\ntrafficPolicy:\n  loadBalancer: {simple: FASTEST}"),
        "config/test.yaml: DestinationRule/inference: spec.trafficPolicy.loadBalancer.simple: must be one of UNSPECIFIED, ROUND_ROBIN",
    ),
    (
        dr_yaml(
            "host: inference\ntrafficPolicy:\n  loadBalancer: {simple: RANDOM, consistentHash: {httpHeaderName: x}}"
        ),
        "spec.trafficPolicy.loadBalancer: must have exactly one of simple or consistentHash",
    ),
    (
        dr_yaml(
            "host: inference\ntrafficPolicy:\n  loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 64}}}"
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash: needs httpHeaderName, useSourceIp or the meshserve.io/hash-fields annotation",
    ),
    (
        dr_yaml(
            "host: inference\ntrafficPolicy:\n  loadBalancer: {consistentHash: {httpCookie: {name: c}}}"
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie: is an Istio field that meshserve does not support",
    ),
    (
        dr_yaml("host: inference\ntrafficPolicy:\n  outlierDetection: {interval: 0s}"),
        "spec.trafficPolicy.outlierDetection.interval: must be a positive duration",
    ),
    (
        dr_yaml("host: inference\ntrafficPolicy:\n  outlierDetection: {maxEjectionPercent: 120}"),
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent: must be an integer in [0, 100], got 120",
    ),
    (
        dr_yaml("host: inference\nsubsets:\n- name: v1\n- name: v1"),
        "spec.subsets[1].name: duplicate subset 'v1'",
    ),
    (
        dr_yaml("host: inference", annotations='meshserve.io/hash-fields: "model_name,tenant"'),
        "metadata.annotations.meshserve.io/hash-fields: unknown request field 'tenant'",
    ),
    (
        dr_yaml("host: inference", annotations='meshserve.io/hash-fields: "model_name"'),
        "annotation meshserve.io/hash-fields needs a consistentHash loadBalancer",
    ),
    (
        dr_yaml("host: inference", annotations='meshserve.io/bounded-load: "0.5"'),
        'metadata.annotations.meshserve.io/bounded-load: must be a factor >= 1.0 (e.g. "1.25") or "off"',
    ),
    (
        dr_yaml("host: inference", annotations='meshserve.io/hot-key-replicas: "two"'),
        "metadata.annotations.meshserve.io/hot-key-replicas: must be an integer in [1, 1024]",
    ),
    (
        dr_yaml("host: inference", annotations='meshserve.io/cold-spill: "0.5"'),
        'metadata.annotations.meshserve.io/cold-spill: must be a factor >= 1.0 (e.g. "2"',
    ),
    (
        dr_yaml("host: inference", annotations='meshserve.io/ring-size: "9"'),
        "metadata.annotations.meshserve.io/ring-size: unknown meshserve annotation",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: g}\nspec: {}\n",
        "config/test.yaml: document 1: kind: Sidecar is an Istio kind that meshserve does not "
        "support",
    ),
    (
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: g}\nspec: {}\n",
        "config/test.yaml: document 1: kind: must be one of VirtualService",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {}\n",
        "config/test.yaml: VirtualService/x: apiVersion: VirtualService needs one of networking.istio.io/v1",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: Bad_Name}\nspec: {hosts: [a]}\n",
        "metadata.name: must be a lower-case DNS-1123 name",
    ),
    ("kind: [unclosed\n", "config/test.yaml: line 2, column 1: not valid YAML"),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {mtls: {mode: SOMETIMES}}\n",
        "config/test.yaml: PeerAuthentication/p: spec.mtls.mode: must be one of UNSET, DISABLE, PERMISSIVE, STRICT",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: CUSTOM}\n",
        "AuthorizationPolicy/a: spec.action: CUSTOM is an Istio action that meshserve does not support",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {rules: [{from: [{source: {ipBlocks: [not-an-ip]}}]}]}\n",
        "spec.rules[0].from[0].source.ipBlocks[0]: is not an IP address or CIDR block",
    ),
    (
        vs_yaml(ROUTE.replace("- route:", "- match: [{x-meshserve: {model: {}}}]\n  route:")),
        "spec.http[0].match[0].x-meshserve.model: must have one of exact, prefix or regex",
    ),
    (
        vs_yaml(
            ROUTE.replace("- route:", "- match: [{x-meshserve: {modle: {exact: a}}}]\n  route:")
        ),
        "spec.http[0].match[0].x-meshserve.modle: unknown field (expected one of: model)",
    ),
    (
        vs_yaml(
            ROUTE.replace("- route:", "- match: [{x-meshserve: {model: {regex: '('}}}]\n  route:")
        ),
        "spec.http[0].match[0].x-meshserve.model.regex: not an RE2 regular expression",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[m[:60] for _, m in ERRORS])
def test_invalid_config_errors_name_file_resource_and_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_yaml(text, source="config/test.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("config/test.yaml: ")
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT


VS_V3 = vs_yaml("- route:\n  - destination: {host: inference, subset: v3}")
DR_V1_V2 = dr_yaml("host: inference.meshserve.svc.cluster.local\nsubsets:\n- name: v1\n- name: v2")


def test_unknown_subset_names_both_resources() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_yaml(VS_V3 + "---\n" + DR_V1_V2, source="config/all.yaml")
    assert str(caught.value) == (
        "config/all.yaml: VirtualService/inference: spec.http[0].route[0].destination.subset: "
        "subset 'v3' is not defined by DestinationRule/inference (config/all.yaml) for host "
        "'inference' (subsets: v1, v2)"
    )
    with pytest.raises(ConfigError, match="needs a DestinationRule for that host"):
        config_from_yaml(VS_V3, source="config/vs.yaml")


def test_duplicates_are_rejected_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(vs_yaml(ROUTE))
    (tmp_path / "b.yaml").write_text(
        vs_yaml(ROUTE, name="other", hosts="[inference.meshserve.svc.cluster.local]")
    )
    with pytest.raises(ConfigError) as caught:
        config_from_path(tmp_path)
    assert (
        "b.yaml: VirtualService/other: spec.hosts[0]: host 'inference' is already routed by VirtualService/inference"
        in str(caught.value)
    )
    (tmp_path / "b.yaml").write_text(vs_yaml(ROUTE))
    with pytest.raises(
        ConfigError, match=r"b.yaml: VirtualService/inference: metadata.name: duplicate"
    ):
        config_from_path(tmp_path)


def test_directory_loading_is_sorted_and_skips_subfolders_and_dotfiles(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text(dr_yaml("host: data", name="data"))
    (tmp_path / "a.yaml").write_text(vs_yaml(ROUTE) + "---\n---\n")
    (tmp_path / ".swap.yaml").write_text("not: [valid")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "c.yaml").write_text(vs_yaml(ROUTE))
    (tmp_path / "notes.txt").write_text("ignored")
    docs = load_path(tmp_path)
    assert [d.ref for d in docs] == ["VirtualService/inference", "DestinationRule/data"]
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_path(tmp_path / "missing")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5s", 1.5),
        ("100ms", 0.1),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("250us", 250e-6),
        ("0s", 0.0),
        (".5s", 0.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "1.5", "1x", "-1s", "1s junk", "ms"])
def test_bad_durations(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    "host",
    [
        "inference",
        "inference.meshserve",
        "inference.meshserve.svc",
        "inference.meshserve.svc.cluster.local",
        "Inference.meshserve.svc.cluster.local.",
    ],
)
def test_host_forms_normalise_to_one_service(host: str) -> None:
    assert normalise_host(host) == "inference"


@pytest.mark.parametrize("host", ["", "inference.default.svc.cluster.local", "bad_name", "-x"])
def test_bad_hosts(host: str) -> None:
    with pytest.raises(ValueError):
        normalise_host(host)
