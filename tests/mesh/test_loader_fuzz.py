"""Hypothesis: whatever YAML tree of the kinds it is given, the loader answers with a
resource or its own ConfigError (INVALID_ARGUMENT naming the problem), never another
exception."""

from __future__ import annotations

import copy
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.config.fields import ConfigError
from mesh.config.loader import load_yaml, parse_resource, parse_yaml
from mesh.config.resource import API_VERSIONS
from mesh.config.snapshot import MeshConfig
from mesh.config.views import MESH_VIEW, ingress_view
from tests.mesh.security.jwt_support import Issuer

REPO = Path(__file__).resolve().parents[2]

#: Field names of the four kinds (and a few Istio ones meshserve refuses), so generated
#: trees reach deep into the parsers instead of failing at the first unknown key.
FIELDS = [
    # Gateway
    "servers",
    "bind",
    "defaultEndpoint",
    "httpsRedirect",
    "credentialName",
    "serverCertificate",
    # RequestAuthentication
    "jwtRules",
    "issuer",
    "audiences",
    "jwksUri",
    "jwks",
    "fromHeaders",
    "prefix",
    "fromParams",
    "outputPayloadToHeader",
    "outputClaimToHeaders",
    "claim",
    "header",
    "forwardOriginalToken",
    # ServiceEntry and DestinationRule tls / portLevelSettings
    "ports",
    "location",
    "resolution",
    "endpoints",
    "address",
    "targetPort",
    "protocol",
    "tls",
    "mode",
    "sni",
    "caCertificates",
    "clientCertificate",
    "privateKey",
    "insecureSkipVerify",
    "portLevelSettings",
    "hosts",
    "http",
    "exportTo",
    "gateways",
    "match",
    "route",
    "destination",
    "host",
    "subset",
    "port",
    "number",
    "weight",
    "headers",
    "request",
    "response",
    "set",
    "add",
    "remove",
    "uri",
    "exact",
    "prefix",
    "regex",
    "ignoreUriCase",
    "withoutHeaders",
    "name",
    "timeout",
    "retries",
    "attempts",
    "perTryTimeout",
    "retryOn",
    "fault",
    "delay",
    "abort",
    "fixedDelay",
    "percentage",
    "percent",
    "value",
    "grpcStatus",
    "httpStatus",
    "mirror",
    "mirrorPercentage",
    "trafficPolicy",
    "loadBalancer",
    "simple",
    "consistentHash",
    "httpHeaderName",
    "ringHash",
    "minimumRingSize",
    "outlierDetection",
    "consecutive5xxErrors",
    "interval",
    "baseEjectionTime",
    "maxEjectionPercent",
    "connectionPool",
    "tcp",
    "maxConnections",
    "connectTimeout",
    "http2MaxRequests",
    "maxRetries",
    "subsets",
    "labels",
    "selector",
    "matchLabels",
    "mtls",
    "mode",
    "portLevelMtls",
    "action",
    "rules",
    "from",
    "to",
    "when",
    "source",
    "operation",
    "principals",
    "namespaces",
    "ipBlocks",
    "remoteIpBlocks",
    "serviceAccounts",
    "paths",
    "notPaths",
    "methods",
    "ports",
    "key",
    "values",
    "notValues",
    "provider",
    "tls",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "",
            "inference",
            "inference.meshserve.svc.cluster.local",
            "v1",
            "1s",
            "100ms",
            "ROUND_ROBIN",
            "STRICT",
            "ALLOW",
            "DENY",
            "CUSTOM",
            "5xx",
            "503,reset",
            "*",
            "/inference.GRPCInferenceService/{*}",
            "{**}",
            "(?=x)",
            "\\pL+",
            "10.0.0.0/8",
            "mesh",
            ".",
            "~",
            "request.headers[x]",
            "meshserve/gateway",
            "GRPC",
            "HTTPS",
            "./inference.meshserve.svc.cluster.local",
            "*/*.example.com",
            "meshserve/*",
            "UNAVAILABLE",
        ]
    ),
    st.text(max_size=12),
)
KEYS = st.sampled_from([*FIELDS, "", "X-Upper", "x-meshserve", 0, 8090, True, None])
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5)
    ),
    max_leaves=30,
)
KINDS = st.sampled_from(list(API_VERSIONS))
#: What a copied object's creation time may look like, and what it must not: any time
#: (naive, UTC, or a fixed offset up to a day, as YAML writes them), text, any tree.
CREATED = st.one_of(
    st.datetimes(
        timezones=st.one_of(
            st.none(),
            st.builds(
                timezone,
                st.timedeltas(min_value=-timedelta(hours=23), max_value=timedelta(hours=23)),
            ),
        )
    ),
    st.text(max_size=30),
    TREES,
)


@st.composite
def documents(draw: st.DrawFn) -> Any:
    kind = draw(KINDS)
    document: dict[Any, Any] = {
        "apiVersion": draw(st.sampled_from([*API_VERSIONS[kind] * 4, "v1", 3])),
        "kind": kind,
        "metadata": draw(
            st.one_of(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["inference", "x", "Bad"])},
                    optional={
                        "namespace": st.sampled_from(["meshserve", "ops", ""]),
                        "annotations": TREES,
                        "labels": TREES,
                        "creationTimestamp": CREATED,
                    },
                ),
                TREES,
            )
        ),
        "spec": draw(TREES),
    }
    if draw(st.booleans()):
        document[draw(KEYS)] = draw(TREES)
    return document


def check(raw: Any) -> None:
    try:
        parse_resource(raw, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.code is grpc.StatusCode.INVALID_ARGUMENT
        assert str(exc).startswith("fuzz.yaml")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=documents())
def test_parse_resource_raises_only_config_errors(raw: Any) -> None:
    check(raw)


#: Valid documents of every kind: mutating one subtree of these reaches every parser deep
#: down, where a random tree mostly stops at its first wrong key.
SEEDS = (
    [
        doc
        for path in sorted((REPO / "config").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    + list(
        yaml.safe_load_all(
            """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a}
spec:
  action: DENY
  selector: {matchLabels: {app: inference}}
  rules:
    - from: [{source: {principals: [a], serviceAccounts: [ns/sa], remoteIpBlocks: [10.0.0.0/8]}}]
      to: [{operation: {paths: ['/x/{*}'], hosts: [a], ports: ['80'], methods: [POST]}}]
      when: [{key: 'request.headers[x]', values: [a]}, {key: source.ip, notValues: [10.0.0.1]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se}
spec:
  hosts: [models.example.com]
  location: MESH_EXTERNAL
  ports: [{number: 8001, name: grpc, protocol: GRPC, targetPort: 9001}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1, ports: {grpc: 9002}, labels: {v: a}, weight: 2}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: se}
spec:
  host: models.example.com
  trafficPolicy:
    tls: {mode: SIMPLE, sni: models.example.com, caCertificates: /ca.pem}
    portLevelSettings:
      - port: {number: 8001}
        tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}
        loadBalancer: {simple: RANDOM}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p}
spec:
  selector: {matchLabels: {app: inference}}
  mtls: {mode: STRICT}
  portLevelMtls: {8090: {mode: DISABLE}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: g}
spec:
  selector: {istio: ingressgateway}
  servers:
    - name: a
      port: {number: 8080, name: grpc, protocol: GRPC, targetPort: 8080}
      hosts: ['*/inference.meshserve.svc.cluster.local', './*.example.com', '*']
    - port: {number: 9090, protocol: HTTP2}
      hosts: [meshserve/training]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v}
spec:
  hosts: [inference]
  exportTo: ['*']
  gateways: [g, mesh, meshserve/g]
  http:
    - name: r
      match:
        - uri: {regex: '/a.*'}
          gateways: [mesh]
          headers: {x-a: {exact: b}}
          withoutHeaders: {x-b: {}}
      timeout: 1s
      retries: {attempts: 2, perTryTimeout: 1s, retryOn: '503,reset'}
      fault: {delay: {fixedDelay: 1s, percentage: {value: 1}}, abort: {httpStatus: 503}}
      mirror: {host: inference, subset: v1}
      mirrorPercentage: {value: 5}
      headers: {request: {set: {X-A: b}, remove: [x-c]}, response: {add: {x-d: e}}}
      route:
        - {destination: {host: inference, subset: v1}, weight: 1, headers: {request: {set: {a: b}}}}
        - {destination: {host: inference}, weight: 3}
"""
        )
    )
    + [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "ra"},
            "spec": {
                "selector": {"matchLabels": {"app": "inference"}},
                "jwtRules": [
                    {
                        "issuer": "https://a.example.com",
                        "audiences": ["inference"],
                        "jwks": Issuer.ec("https://a.example.com").jwks(),
                        "fromHeaders": [{"name": "x-jwt", "prefix": "Bearer "}],
                        "outputPayloadToHeader": "x-payload",
                        "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}],
                        "forwardOriginalToken": True,
                        "timeout": "2s",
                    },
                    {"issuer": "b", "jwksUri": "https://b.example.com/jwks.json"},
                ],
            },
        }
    ]
)


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths(value, (*prefix, index))
    return found


@st.composite
def mutants(draw: st.DrawFn) -> Any:
    document = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(document)))
        if not path:
            continue
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            parent[draw(KEYS)] = draw(TREES)  # a new key beside the old one
        else:
            parent[path[-1]] = draw(TREES)
    return document


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutants())
def test_mutated_valid_documents_raise_only_config_errors(raw: Any) -> None:
    check(raw)


def test_seeds_are_valid() -> None:
    """The mutation test starts from documents that parse (else it tests little)."""
    for raw in SEEDS:
        parse_resource(raw, "seed.yaml")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=TREES)
def test_any_tree_at_all_raises_only_config_errors(raw: Any) -> None:
    check(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raws=st.lists(documents(), min_size=1, max_size=3))
def test_yaml_text_to_snapshot_raises_only_config_errors(raws: list[Any]) -> None:
    """The whole path a file takes: YAML text → resources → one cross-checked snapshot."""
    text = yaml.safe_dump_all(raws)
    try:
        config = MeshConfig.build(parse_yaml(text, "fuzz.yaml"), version=1, source="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")
        return
    # Every view's route table builds from whatever the snapshot accepted.
    for view in (MESH_VIEW, ingress_view(port=8080), ingress_view(port=None)):
        config.routes(view)


@pytest.mark.parametrize(
    "text",
    ["[" * 5000 + "]" * 5000, "a: " + "{b: " * 3000 + "c" + "}" * 3000],
    ids=["lists", "mappings"],
)
def test_yaml_nested_too_deeply_is_a_config_error(text: str) -> None:
    """Such a file raised RecursionError from PyYAML's recursive composer: a traceback
    from ``meshserve apply``, an INTERNAL from the Admin API."""
    with pytest.raises(ConfigError, match=r"^deep\.yaml: .*nested too deeply"):
        parse_yaml(text, "deep.yaml")
    with pytest.raises(ConfigError, match=r"^deep\.yaml: .*nested too deeply"):
        load_yaml(text, "deep.yaml")


def test_an_ignored_status_nested_too_deeply_to_dump_is_a_config_error() -> None:
    """Deep enough to parse, too deep for the dump every Document keeps."""
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n"
        "spec: {hosts: [x], http: [{route: [{destination: {host: x}}]}]}\n"
        "status: " + "[" * 450 + "]" * 450
    )
    with pytest.raises(ConfigError, match=r"^deep\.yaml: .*nested too deeply"):
        parse_yaml(text, "deep.yaml")
