"""Gateway and VirtualService ``gateways``: which rules apply at the ingress and which in
the sidecars (``mesh``), asserted through the routing core (issue 14).

The examples follow Istio's reference (networking Gateway and VirtualService ``gateways``,
``match.gateways``) with hosts renamed to mesh services.
"""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.config.fields import ConfigError
from mesh.config.snapshot import MeshConfig, config_from_path, config_from_yaml
from mesh.config.views import MESH_VIEW, View, gateway_view, ingress_view
from mesh.errors import Unimplemented
from mesh.routing.decision import RequestInfo, RouteDecision, decide
from mesh.routing.discovery import StaticInstance

INFER = "/inference.GRPCInferenceService/ModelInfer"
TRAIN = "/meshserve.training.v1.Training/SubmitJob"
INGRESS = ingress_view(port=8080)


def gateway(
    hosts: str = "['*/inference.meshserve.svc.cluster.local', '*/training']",
    *,
    name: str = "ingress",
    namespace: str = "meshserve",
    selector: str = "{istio: ingressgateway}",
    port: int = 8080,
) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: Gateway\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  selector: {selector}\n  servers:\n"
        f"    - port: {{number: {port}, name: grpc, protocol: GRPC}}\n"
        f"      hosts: {hosts}\n"
    )


def vs(http: str, gateways: str = "", *, host: str = "inference", namespace: str = "") -> str:
    meta = f", namespace: {namespace}" if namespace else ""
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {host}{meta}}}\nspec:\n"
        f"  hosts: [{host}.meshserve.svc.cluster.local]\n"
        + (f"  gateways: {gateways}\n" if gateways else "")
        + f"  http:\n{http}"
    )


SUBSETS = (
    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: inference}\n"
    "spec:\n  host: inference\n  subsets:\n"
    "    - {name: v1, labels: {version: v1}}\n    - {name: v2, labels: {version: v2}}\n"
)
ROUTE_V2 = "      route: [{destination: {host: inference, subset: v2}}]\n"
TO_V2 = "    - route: [{destination: {host: inference, subset: v2}}]\n"


def config(*documents: str) -> MeshConfig:
    return config_from_yaml("---\n".join([SUBSETS, *documents]), source="istio.yaml")


def route(
    cfg: MeshConfig, view: View, method: str = INFER, headers: dict[str, str] | None = None
) -> RouteDecision:
    workers = [
        StaticInstance("inference", f"w{i}", f"10.0.0.{i}:8001", {"version": f"v{i % 2 + 1}"})
        for i in range(4)
    ] + [StaticInstance("training", "t0", "10.0.1.1:8001")]
    clusters = ClusterMap(
        cfg, EndpointsSnapshot.from_instances(workers), LoadTracker(), lambda: 0.0, view=view
    )
    # A call at an ingress arrives on the port its view names.
    request = RequestInfo(method, tuple((headers or {}).items()), port=view.port)
    return decide(clusters, request, random.Random(1), explain=True)


def no_route(cfg: MeshConfig, view: View, method: str = INFER) -> str:
    with pytest.raises(Unimplemented) as caught:
        route(cfg, view, method)
    assert caught.value.code is grpc.StatusCode.UNIMPLEMENTED
    return caught.value.message


def target(decision: RouteDecision) -> str:
    return f"{decision.target} by {decision.route}"


# --- which rules apply where -------------------------------------------------------------


def test_bound_to_the_gateway_only_routes_at_the_ingress_and_not_in_sidecars() -> None:
    cfg = config(gateway(), vs(TO_V2, "[ingress]"))
    assert target(route(cfg, INGRESS)) == "inference/v2 by VirtualService/inference http[0]"
    # Sidecars: no VirtualService applies, so the host's default route (no subset).
    assert target(route(cfg, MESH_VIEW)) == "inference by default"


def test_bound_to_mesh_only_routes_in_sidecars_and_not_at_the_ingress() -> None:
    cfg = config(gateway(), vs(TO_V2, "[mesh]"))
    assert route(cfg, MESH_VIEW).subset == "v2"
    message = no_route(cfg, INGRESS)
    assert "no VirtualService bound to Gateway/ingress (meshserve) routes host 'inference'" in (
        message
    )


def test_without_gateways_a_virtual_service_is_for_sidecars_only_once_a_gateway_exists() -> None:
    cfg = config(gateway(), vs(TO_V2))
    assert route(cfg, MESH_VIEW).subset == "v2"
    assert no_route(cfg, INGRESS).startswith("no route: no VirtualService bound")


def test_bound_to_the_gateway_and_mesh_routes_in_both() -> None:
    cfg = config(gateway(), vs(TO_V2, "[ingress, mesh]"))
    assert route(cfg, INGRESS).subset == "v2"
    assert route(cfg, MESH_VIEW).subset == "v2"


def test_qualified_names_and_gateways_of_other_namespaces() -> None:
    cfg = config(
        gateway(name="edge", namespace="ops"), vs(TO_V2, "[ops/edge]"), gateway(name="ingress")
    )
    # Both Gateways select the ingress on 8080; the rules are bound to ops/edge only.
    assert route(cfg, INGRESS).subset == "v2"
    assert route(cfg, gateway_view("ops/edge")).subset == "v2"
    assert no_route(cfg, gateway_view("meshserve/ingress")).startswith(
        "no route: no VirtualService bound to Gateway/ingress"
    )


def test_match_gateways_narrow_the_virtual_service_list() -> None:
    """A match entry's ``gateways`` narrow the VirtualService's for that entry; the
    header rule below is for sidecars, so the ingress skips it."""
    http = (
        "    - match: [{headers: {end-user: {exact: jason}}, gateways: [mesh]}]\n"
        "      route: [{destination: {host: inference, subset: v2}}]\n"
        "    - route: [{destination: {host: inference, subset: v1}}]\n"
    )
    cfg = config(gateway(), vs(http, "[ingress, mesh]"))
    jason = {"end-user": "jason"}
    assert route(cfg, MESH_VIEW, headers=jason).subset == "v2"
    at_ingress = route(cfg, INGRESS, headers=jason)
    assert at_ingress.subset == "v1"
    assert at_ingress.route == "VirtualService/inference http[1]"


def test_a_match_entry_narrows_the_virtual_service_gateways() -> None:
    """A match entry's gateways apply within the VirtualService's own: bound to
    [ingress, mesh], an entry for [ingress] matches at the ingress and not in sidecars."""
    http = (
        "    - match: [{uri: {prefix: /inference.}, gateways: [ingress]}]\n"
        "      route: [{destination: {host: inference, subset: v2}}]\n"
    )
    cfg = config(gateway(), vs(http, "[ingress, mesh]"))
    assert route(cfg, INGRESS).subset == "v2"
    # In the sidecars its only rule applies elsewhere: no rule matches (never match-all).
    assert no_route(cfg, MESH_VIEW).startswith("no route: no rule of VirtualService/inference")


# --- the ingress: selector, port and hosts -------------------------------------------------


def test_a_host_the_gateway_servers_do_not_expose_has_no_route_at_the_ingress() -> None:
    cfg = config(gateway(hosts="['*/training']"), vs(TO_V2, "[ingress, mesh]"))
    message = no_route(cfg, INGRESS)
    assert message == (
        "no route: host 'inference' is not among the hosts of Gateway/ingress (meshserve) "
        "on port 8080"
    )
    assert route(cfg, MESH_VIEW).subset == "v2"


def test_an_exposed_host_without_a_bound_virtual_service_has_no_route_at_the_ingress() -> None:
    """A Gateway has no default route: training is exposed, but nothing routes it there."""
    cfg = config(gateway(), vs(TO_V2, "[ingress]"))
    assert "routes host 'training'" in no_route(cfg, INGRESS, TRAIN)
    assert route(cfg, MESH_VIEW, TRAIN).route == "default"


@pytest.mark.parametrize(
    ("hosts", "routed"),
    [
        ("['*']", True),
        ("['*/*.meshserve.svc.cluster.local']", True),
        ("['./inference']", True),
        ("['meshserve/*']", True),
        ("['ops/*']", False),  # only VirtualServices of namespace ops
        ("['*.example.com']", False),
        ("['*/data.meshserve.svc.cluster.local']", False),
    ],
)
def test_server_hosts_select_hosts_and_namespaces(hosts: str, routed: bool) -> None:
    cfg = config(gateway(hosts=hosts), vs(TO_V2, "[ingress]"))
    if routed:
        assert route(cfg, INGRESS).subset == "v2"
    else:
        assert no_route(cfg, INGRESS).startswith("no route:")


def test_a_gateway_on_another_port_or_selecting_other_labels_routes_nothing_here() -> None:
    for other in (gateway(port=9090), gateway(selector="{app: edge}")):
        cfg = config(other, vs(TO_V2, "[ingress]"))
        message = no_route(cfg, INGRESS)
        assert message.startswith("no route: no Gateway selects this ingress (labels ")
        assert "port 8080" in message
    # The same Gateway applies to an ingress whose port and labels it names.
    cfg = config(gateway(port=9090, selector="{app: edge}"), vs(TO_V2, "[ingress]"))
    assert route(cfg, ingress_view([("app", "edge")], 9090)).subset == "v2"


def test_an_empty_selector_selects_every_ingress() -> None:
    cfg = config(gateway(selector="{}"), vs(TO_V2, "[ingress]"))
    assert route(cfg, ingress_view([("app", "anything")], 8080)).subset == "v2"


# --- no Gateway at all: meshserve's implicit ingress (extension) ---------------------------


def test_without_any_gateway_the_ingress_applies_virtual_services_without_gateways() -> None:
    cfg = config(vs(TO_V2))
    assert route(cfg, INGRESS).subset == "v2"
    assert route(cfg, MESH_VIEW).subset == "v2"
    assert "no Gateway in the config" in route(cfg, INGRESS).explanation[0]


def test_without_any_gateway_a_mesh_only_virtual_service_skips_the_ingress() -> None:
    cfg = config(vs(TO_V2, "[mesh]"))
    assert route(cfg, MESH_VIEW).subset == "v2"
    assert route(cfg, INGRESS).route == "default"


# --- refused at load, naming the field -----------------------------------------------------


@pytest.mark.parametrize(
    ("documents", "path"),
    [
        ((vs(TO_V2, "[nowhere]"),), "VirtualService/inference: spec.gateways[0]"),
        ((gateway(), vs(TO_V2, "[ingress, ops/ingress]")), "spec.gateways[1]"),
        (
            (gateway(), vs("    - match: [{gateways: [edge]}]\n" + ROUTE_V2)),
            "spec.http[0].match[0].gateways[0]",
        ),
    ],
)
def test_a_gateway_name_that_matches_no_gateway_is_refused(
    documents: tuple[str, ...], path: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config(*documents)
    assert f"{path}: gateway " in str(caught.value)
    assert "names no Gateway in the config" in str(caught.value)


def test_a_match_entry_for_a_gateway_the_virtual_service_is_not_bound_to_is_refused() -> None:
    """Istio's reference says match gateways override the VirtualService's, but Istio
    finds a VirtualService through its own gateways alone (unset: mesh), so this entry
    would never apply at the ingress: refused rather than silently dropped."""
    http = "    - match: [{uri: {prefix: /inference.}, gateways: [ingress]}]\n" + ROUTE_V2
    with pytest.raises(ConfigError) as caught:
        config(gateway(), vs(http))
    message = str(caught.value)
    assert "spec.http[0].match[0].gateways[0]: gateway 'meshserve/ingress' is not among" in (
        message
    )
    assert "(mesh: unset means mesh)" in message and "add it to spec.gateways" in message


def test_a_gateway_view_for_a_missing_gateway_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        config(gateway()).routes(gateway_view("meshserve/other"))


def test_explain_says_which_view_it_explains() -> None:
    cfg = config(gateway(), vs(TO_V2, "[ingress, mesh]"))
    at_ingress = route(cfg, INGRESS).explanation[0]
    assert at_ingress.startswith("view ingress (labels ")
    assert "Gateway/ingress (meshserve), server 0 port 8080" in at_ingress
    assert route(cfg, MESH_VIEW).explanation[0] == "view mesh: the sidecars' rules"


def test_the_shipped_config_routes_at_its_gateway_and_in_sidecars() -> None:
    shipped = config_from_path(Path(__file__).resolve().parents[2] / "config")
    assert set(shipped.gateways) == {"meshserve/meshserve-gateway"}
    for view in (INGRESS, MESH_VIEW):
        assert set(shipped.routes(view).by_host) == {"inference", "training", "data"}
