"""One host in several VirtualServices, one per view (issue 14): Istio's gateway/mesh split.

Istio accepts several VirtualServices for one host. In the sidecars (``mesh``) only one
may apply (a second is a conflict, IST0109): meshserve refuses it naming both. At an
ingress Istio appends each bound VirtualService's rules to the host's virtual host, in
creation order, then name, then namespace; meshserve does the same with a copied
``creationTimestamp`` (a hand-written file has none: Istio's zero time, so the name
decides), and moves catch-all routes last as Istio does (docs/configuration.md).
Asserted through the routing core.
"""

from __future__ import annotations

import pytest

from mesh.balance.endpoints import EndpointsSnapshot
from mesh.config.fields import ConfigError
from mesh.config.loader import parse_yaml
from mesh.config.views import MESH_VIEW, gateway_view
from mesh.routing.admission import admission_problems
from mesh.routing.diff import routing_diff
from mesh.routing.discovery import StaticInstance
from tests.mesh.test_gateway_binding import (
    INFER,
    INGRESS,
    config,
    gateway,
    no_route,
    route,
    target,
)

TO_V1 = "    - route: [{destination: {host: inference, subset: v1}}]\n"
TO_V2 = "    - route: [{destination: {host: inference, subset: v2}}]\n"


def named(name: str, http: str, gateways: str = "", *, extra: str = "") -> str:
    """A VirtualService for host inference named ``name``."""
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}}}\nspec:\n"
        "  hosts: [inference.meshserve.svc.cluster.local]\n"
        + (f"  gateways: {gateways}\n" if gateways else "")
        + extra
        + f"  http:\n{http}"
    )


def header_rule(value: str, subset: str) -> str:
    return (
        f"    - name: {value}\n"
        f"      match: [{{headers: {{x-lane: {{exact: {value}}}}}}}]\n"
        f"      route: [{{destination: {{host: inference, subset: {subset}}}}}]\n"
    )


def refused(*documents: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config(*documents)
    return str(caught.value)


# --- accepted splits: each view routes by the one that applies there ----------------------


@pytest.mark.parametrize(
    ("edge_gateways", "mesh_gateways"),
    [
        ("[ingress]", ""),  # the common Istio pattern: one bound to the Gateway, one unset
        ("[ingress]", "[mesh]"),
        ("[meshserve/ingress]", "[mesh]"),
    ],
)
def test_one_host_split_between_the_gateway_and_mesh_routes_each_view_by_its_own(
    edge_gateways: str, mesh_gateways: str
) -> None:
    cfg = config(
        gateway(),
        named("inference-edge", TO_V2, edge_gateways),
        named("inference-mesh", TO_V1, mesh_gateways),
    )
    assert cfg.virtual_services_for("inference") == cfg.virtual_service_list
    assert [v.ref for v in cfg.virtual_service_list] == [
        "VirtualService/inference-edge",
        "VirtualService/inference-mesh",
    ]
    assert target(route(cfg, INGRESS)) == "inference/v2 by VirtualService/inference-edge http[0]"
    assert target(route(cfg, gateway_view("meshserve/ingress"))).startswith("inference/v2")
    assert target(route(cfg, MESH_VIEW)) == "inference/v1 by VirtualService/inference-mesh http[0]"


def test_a_match_bound_to_mesh_outside_the_virtual_service_gateways_is_refused() -> None:
    """Istio finds a VirtualService bound to [ingress] only through that Gateway, so a
    match entry naming mesh never applies there (Istio drops it silently): refused."""
    edge = (
        "    - match: [{gateways: [mesh], headers: {x-lane: {exact: fast}}}]\n"
        "      route: [{destination: {host: inference, subset: v2}}]\n"
    )
    message = refused(gateway(), named("a-mesh", edge, "[ingress]"), named("b-edge", TO_V1))
    assert "VirtualService/a-mesh: spec.http[0].match[0].gateways[0]: gateway 'mesh' is " in (
        message
    )
    assert "not among the VirtualService's gateways (meshserve/ingress)" in message


# --- refused: two in the mesh view ---------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("", ""),
        ("[mesh]", ""),
        ("[ingress, mesh]", ""),
        ("[ingress, mesh]", "[mesh]"),
    ],
)
def test_two_for_one_host_in_the_mesh_view_are_refused_naming_both(first: str, second: str) -> None:
    message = refused(gateway(), named("first", TO_V1, first), named("second", TO_V2, second))
    assert message.startswith(
        "istio.yaml: VirtualService/second: spec.hosts[0]: host 'inference' is already "
        "routed by VirtualService/first (istio.yaml) in the mesh view (sidecars)"
    )


def test_a_match_bound_to_mesh_counts_in_the_mesh_view() -> None:
    edge = (
        "    - match: [{gateways: [mesh]}]\n"
        "      route: [{destination: {host: inference, subset: v2}}]\n"
    )
    message = refused(gateway(), named("a", edge, "[ingress, mesh]"), named("b", TO_V1))
    assert "VirtualService/b: spec.hosts[0]" in message
    assert "already routed by VirtualService/a (istio.yaml) in the mesh view" in message


def test_without_any_gateway_two_for_one_host_are_refused() -> None:
    # The implicit ingress takes what mesh takes: the same conflict.
    message = refused(named("first", TO_V1), named("second", TO_V2))
    assert "already routed by VirtualService/first (istio.yaml) in the mesh view" in message


# --- merged at a Gateway, in Istio's order without creation time --------------------------


def test_two_bound_to_one_gateway_are_merged_in_name_order() -> None:
    # Written z before a: the merge follows names, not the file.
    z = named("z-late", header_rule("slow", "v1") + TO_V1, "[ingress]")
    a = named("a-early", header_rule("fast", "v2"), "[ingress]")
    cfg = config(gateway(), z, a)
    merged = cfg.routes(INGRESS).virtual_service("inference")
    assert merged is not None
    assert merged.ref == "VirtualService/a-early + VirtualService/z-late"
    assert [r.name for r in merged.http] == ["fast", "slow", ""]
    assert route(cfg, INGRESS, headers={"x-lane": "fast"}).route == (
        "VirtualService/a-early http[0] (fast)"
    )
    assert route(cfg, INGRESS, headers={"x-lane": "slow"}).route == (
        "VirtualService/z-late http[0] (slow)"
    )
    assert route(cfg, INGRESS).route == "VirtualService/z-late http[1]"
    # Sidecars: neither applies, the default route.
    assert target(route(cfg, MESH_VIEW)) == "inference by default"


@pytest.mark.parametrize(
    ("early", "late"),
    [
        # As kubectl writes them (quoted), and unquoted with an offset (a string too).
        ('"2024-05-01T12:00:00Z"', '"2024-05-01T12:00:01Z"'),
        ("2024-05-01T12:00:00Z", "2024-05-01T14:00:00+01:00"),
    ],
)
def test_objects_copied_with_their_creation_time_merge_in_creation_order(
    early: str, late: str
) -> None:
    # z was created first: its rule comes first although its name is later.
    z = named("z-first", header_rule("fast", "v1"), "[ingress]")
    a = named("a-second", header_rule("fast", "v2"), "[ingress]")
    z = z.replace("name: z-first}", f"name: z-first, creationTimestamp: {early}}}")
    a = a.replace("name: a-second}", f"name: a-second, creationTimestamp: {late}}}")
    cfg = config(gateway(), a, z)
    assert route(cfg, INGRESS, headers={"x-lane": "fast"}).route == (
        "VirtualService/z-first http[0] (fast)"
    )
    # Created in the same second: name order, Istio's tie-break.
    same = config(gateway(), a.replace(late, early), z)
    assert route(same, INGRESS, headers={"x-lane": "fast"}).subset == "v2"
    # A file without creationTimestamp has Istio's zero time: before every copied object.
    fresh = config(gateway(), named("zz-file", header_rule("fast", "v1"), "[ingress]"), a)
    assert route(fresh, INGRESS, headers={"x-lane": "fast"}).subset == "v1"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("yesterday", "'yesterday' is not an RFC 3339 time"),
        ("2024-05-01", "'2024-05-01' is not an RFC 3339 time"),
        ("2024-05-01T12:00:00", "has no UTC offset"),
        ("12", "got int"),
    ],
)
def test_a_creation_time_that_is_no_time_is_refused_naming_the_field(
    value: str, problem: str
) -> None:
    text = named("a", TO_V1).replace("name: a}", f"name: a, creationTimestamp: {value}}}")
    message = refused(text)
    assert "metadata.creationTimestamp" in message and problem in message


def test_a_catch_all_of_the_earlier_one_goes_after_the_later_ones_rules_as_in_istio() -> None:
    """Istio sorts a Gateway virtual host's routes (SortVHostRoutes): the catch-all ones
    go last, in their order, so a's catch-all does not hide b's header rule."""
    cfg = config(
        gateway(),
        named("a", TO_V1, "[ingress]"),
        named("b", header_rule("fast", "v2") + TO_V2, "[ingress]"),
    )
    assert route(cfg, INGRESS, headers={"x-lane": "fast"}).route == (
        "VirtualService/b http[0] (fast)"
    )
    # Among the catch-alls the merge order holds: a's first.
    assert route(cfg, INGRESS).route == "VirtualService/a http[0]"


@pytest.mark.parametrize(
    "catch_all",
    ["{uri: {prefix: /}}", "{uri: {regex: '.*'}}", "{uri: {prefix: /}, port: 8080}"],
)
def test_a_catch_all_match_entry_moves_last_and_the_rest_of_its_rule_stays(
    catch_all: str,
) -> None:
    cfg = config(
        gateway(),
        named(
            "a",
            "    - match: [{headers: {x-lane: {exact: slow}}}, " + catch_all + "]\n"
            "      route: [{destination: {host: inference, subset: v1}}]\n",
            "[ingress]",
        ),
        named("b", header_rule("fast", "v2"), "[ingress]"),
    )
    assert route(cfg, INGRESS, headers={"x-lane": "fast"}).subset == "v2"
    # a's specific entry keeps its place before b's rule; its catch-all catches the rest.
    slow = route(cfg, INGRESS, headers={"x-lane": "slow"})
    assert (slow.subset, slow.route) == ("v1", "VirtualService/a http[0]")
    assert route(cfg, INGRESS).route == "VirtualService/a http[0]"


def test_a_prefix_rule_with_a_header_is_not_a_catch_all() -> None:
    cfg = config(
        gateway(),
        named(
            "a",
            "    - match: [{uri: {prefix: /}, headers: {x-lane: {exact: fast}}}]\n"
            "      route: [{destination: {host: inference, subset: v1}}]\n",
            "[ingress]",
        ),
        named("b", header_rule("fast", "v2"), "[ingress]"),
    )
    assert route(cfg, INGRESS, headers={"x-lane": "fast"}).subset == "v1"


def test_no_rule_of_the_merged_ones_matches_names_them_all() -> None:
    cfg = config(
        gateway(),
        named("a", header_rule("fast", "v2"), "[ingress]"),
        named("b", header_rule("slow", "v1"), "[ingress]"),
    )
    assert no_route(cfg, INGRESS) == (
        f"no route: no rule of VirtualService/a + VirtualService/b matches {INFER} (host inference)"
    )


def test_gateways_selecting_one_ingress_merge_gateway_by_gateway() -> None:
    # Istio walks the ingress' servers Gateway by Gateway (by name without creation time):
    # the VirtualService bound to Gateway 'alpha' comes first although its name is later.
    cfg = config(
        gateway(name="zeta"),
        gateway(name="alpha"),
        named("a-on-zeta", header_rule("fast", "v1"), "[zeta]"),
        named("z-on-alpha", header_rule("fast", "v2"), "[alpha]"),
    )
    merged = cfg.routes(INGRESS).virtual_service("inference")
    assert merged is not None
    assert merged.ref == "VirtualService/z-on-alpha + VirtualService/a-on-zeta"
    assert route(cfg, INGRESS, headers={"x-lane": "fast"}).subset == "v2"
    # Each Gateway's own view holds only its own.
    assert route(cfg, gateway_view("meshserve/zeta"), headers={"x-lane": "fast"}).subset == "v1"


def test_a_merge_skips_one_whose_namespace_the_gateway_server_does_not_admit() -> None:
    # The server exposes inference to VirtualServices of namespace 'edge' only: the
    # meshserve one bound to it adds no rule there.
    cfg = config(
        gateway("['edge/inference.meshserve.svc.cluster.local']"),
        named("a", header_rule("fast", "v1"), "[meshserve/ingress]"),
        named(
            "b", TO_V2.replace("inference,", "inference.meshserve,"), "[meshserve/ingress]"
        ).replace("metadata: {name: b}", "metadata: {name: b, namespace: edge}"),
    )
    decision = route(cfg, INGRESS, headers={"x-lane": "fast"})
    assert target(decision) == "inference/v2 by VirtualService/b http[0]"


def test_a_gateway_merge_with_a_namespace_scoped_export_is_refused_naming_both() -> None:
    message = refused(
        gateway(),
        named("a", header_rule("fast", "v1"), "[ingress]", extra="  exportTo: ['.']\n"),
        named("b", TO_V2, "[ingress]"),
    )
    assert message.startswith(
        "istio.yaml: VirtualService/a: spec.exportTo: host 'inference' is also routed at a "
        "Gateway by VirtualService/b (istio.yaml)"
    )
    # Exported to every namespace: merged.
    config(
        gateway(),
        named("a", header_rule("fast", "v1"), "[ingress]", extra="  exportTo: ['*']\n"),
        named("b", TO_V2, "[ingress]"),
    )


# --- what reads the VirtualServices of a host ---------------------------------------------


SPLIT = (gateway(), named("inference-edge", TO_V2, "[ingress]"), named("inference-mesh", TO_V1))


def test_the_diff_compares_a_split_host_virtual_service_by_virtual_service() -> None:
    old = config(*SPLIT)
    new = old.merged(
        parse_yaml(named("inference-edge", TO_V1, "[ingress]"), "admin"), version=2, source="a"
    )
    changes = [(c.kind, c.subject, c.before, c.after) for c in routing_diff(old, new).changes]
    assert changes == [
        (
            "changed",
            "inference VirtualService/inference-edge http[0]",
            "any request → inference/v2 100%",
            "any request → inference/v1 100%",
        )
    ]
    single = config(gateway(), named("inference-edge", TO_V2, "[ingress, mesh]"))
    split = [(c.kind, c.subject) for c in routing_diff(single, old).changes]
    assert split == [
        ("changed", "host inference VirtualService/inference-edge gateways"),
        ("added", "host inference VirtualService/inference-mesh"),
        ("added", "inference VirtualService/inference-mesh http[0]"),
    ]


def test_admission_keeps_a_route_in_each_view_of_a_served_host() -> None:
    running = config(gateway(), named("inference-edge", TO_V1, "[ingress]"), named("mesh", TO_V1))
    only_v1 = EndpointsSnapshot.from_instances(
        [StaticInstance("inference", "w1", "10.0.0.1:8001", {"version": "v1"})]
    )
    assert admission_problems(running, running, only_v1) == []
    # The edge one alone now sends everything to a subset with no instance: refused,
    # naming it, although the mesh one still routes.
    candidate = running.merged(
        parse_yaml(named("inference-edge", TO_V2, "[ingress]"), "edge.yaml"), version=2, source="a"
    )
    assert admission_problems(candidate, running, only_v1) == [
        "edge.yaml: VirtualService meshserve/inference-edge: spec.http[0].route: host "
        "'inference' is served now (1 registered instance) but no destination of http[0] "
        "reaches one (inference/v2: no instance of 'inference' has labels version=v2)"
    ]
