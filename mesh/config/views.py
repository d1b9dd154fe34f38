"""Which VirtualService rules apply where: in the sidecars (``mesh``) or at an ingress.

Istio binds a VirtualService with ``gateways``: unset means ``mesh`` (every sidecar); a
Gateway's name applies it at the ingress that Gateway selects, and only for the hosts that
Gateway's servers expose; ``mesh`` listed too adds the sidecars. ``match[].gateways``
narrows the list for one match entry (Istio finds a VirtualService by its own list alone). A :class:`View` says where routing happens; its
:class:`RouteTable` holds the VirtualServices reduced to what applies there, built once
per config so the routing decision looks up one table and tests no binding per call.

Several VirtualServices may name one host when at most one applies in ``mesh`` (Istio
refuses a sidecar conflict, IST0109, and :meth:`MeshConfig.build` does too). At an ingress
Istio merges them: each one's rules are appended to the host's virtual host, Gateway by
Gateway (Gateways in creation order), and within a Gateway in creation order, then by
name and namespace (:func:`merge_order`; a file without ``creationTimestamp`` has Istio's
zero time, so name order decides); then the catch-all rules go last (:func:`merge`).

meshserve extension (docs/configuration.md): a config with no Gateway at all keeps
meshserve's gateway an implicit ingress for every VirtualService that does not set
``gateways``; once a Gateway exists, Istio's rules hold strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from mesh.config.gateway import MESH, Gateway, Server
from mesh.config.virtual_service import HTTPRoute, MatchRequest, VirtualService

#: The labels ``meshserve gateway`` carries unless told otherwise: its own (the gateway
#: pods' ``app: gateway`` in deploy/k8s, which AuthorizationPolicy and RequestAuthentication
#: selectors match too), and those of Istio's ingress gateway so that copied Istio Gateways
#: select it.
DEFAULT_INGRESS_LABELS = (("app", "gateway"), ("istio", "ingressgateway"))


@dataclass(frozen=True)
class View:
    """Where a routing decision is made.

    ``mesh``: a sidecar's outbound. ``ingress``: the gateway process, known by its labels
    and the port a Gateway server names (None: not yet listening, no server applies).
    ``gateway``: the rules bound to one named Gateway, whichever ingress it selects
    (``route explain --gateway-name``).
    """

    kind: Literal["mesh", "ingress", "gateway"]
    labels: tuple[tuple[str, str], ...] = ()
    port: int | None = None
    #: ``namespace/name`` of the Gateway, for kind ``gateway``.
    gateway: str = ""

    def describe(self) -> str:
        if self.kind == "mesh":
            return "mesh (sidecars)"
        if self.kind == "gateway":
            return f"Gateway {self.gateway}"
        labels = ",".join(f"{k}={v}" for k, v in self.labels) or "none"
        return f"ingress (labels {labels}, port {self.port})"


MESH_VIEW = View("mesh")


def ingress_view(
    labels: Iterable[tuple[str, str]] = DEFAULT_INGRESS_LABELS, port: int | None = None
) -> View:
    return View("ingress", tuple(sorted(labels)), port)


def gateway_view(name: str) -> View:
    return View("gateway", gateway=name)


@dataclass(frozen=True)
class RouteTable:
    """The VirtualServices that apply in one view, by host, with only their rules (and
    match entries) bound there."""

    view: View
    #: What the view resolved to, in words (``route explain`` prints it).
    description: str
    by_host: Mapping[str, VirtualService] = field(default_factory=dict)
    #: Whether a host no VirtualService routes here takes the default route (to the host
    #: itself): in sidecars, and at the implicit ingress. A Gateway has no virtual host
    #: for it, so at a Gateway-configured ingress it has no route.
    default_route: bool = True
    #: Why a host has no route here (None: it has one); strict ingress only.
    refuse: Callable[[str], str | None] = field(default=lambda host: None, compare=False)

    def virtual_service(self, host: str) -> VirtualService | None:
        return self.by_host.get(host)

    def no_route(self, host: str) -> str | None:
        """Envoy's "no route" for a host (gRPC UNIMPLEMENTED), or None when it routes."""
        if host in self.by_host or self.default_route:
            return None
        return self.refuse(host)


def route_table(
    view: View, gateways: Mapping[str, Gateway], virtual_services: Iterable[VirtualService]
) -> RouteTable:
    """The :class:`RouteTable` of ``view``. Raises ``KeyError`` for a ``gateway`` view
    whose Gateway the config does not hold."""
    if view.kind == "mesh":
        return _table(view, "mesh: the sidecars' rules", {MESH}, True, virtual_services)
    if view.kind == "gateway":
        gw = gateways[view.gateway]
        selected = [(gw, gw.servers)]
    elif not gateways:
        return _table(
            view,
            f"{view.describe()}: no Gateway in the config, so every VirtualService without "
            "gateways applies here (meshserve extension)",
            set(),
            True,
            virtual_services,
        )
    else:
        selected = [
            (gw, gw.servers_on(view.port))
            for gw in gateways.values()
            if gw.selects(view.labels) and gw.servers_on(view.port)
        ]
    names = {gw.qualified for gw, _ in selected}
    refs = ", ".join(sorted(f"{gw.ref} ({gw.metadata.namespace})" for gw, _ in selected))
    port = f" on port {view.port}" if view.kind == "ingress" else ""
    # Istio walks the ingress' servers Gateway by Gateway, appending each bound
    # VirtualService's routes to the host's virtual host: a VirtualService takes the rank
    # of the first Gateway here that binds it (a repeat of its rules later could never match).
    rank = {
        gw.qualified: i
        for i, gw in enumerate(sorted((gw for gw, _ in selected), key=_gateway_order))
    }
    by_host: dict[str, VirtualService] = {}
    for host, bound_here in _bound(names, False, virtual_services).items():
        admitted = []
        for vs in bound_here:
            bound = names & _names_bound(vs)
            if any(
                h.admits(vs.metadata.namespace, host)
                for gw, servers in selected
                if gw.qualified in bound
                for server in servers
                for h in server.hosts
            ):
                admitted.append((min(rank[n] for n in bound), vs))
        if admitted:
            admitted.sort(key=lambda found: (found[0], *merge_order(found[1])))
            by_host[host] = merge([vs for _, vs in admitted])

    def refuse(host: str) -> str:
        if not selected:
            return (
                f"no route: no Gateway selects this {view.describe()}: a Gateway applies "
                "where its selector matches the labels and a server names the port "
                f"(Gateways: {', '.join(sorted(gateways))})"
            )
        if not any(h.exposes(host) for _, servers in selected for s in servers for h in s.hosts):
            return f"no route: host {host!r} is not among the hosts of {refs}{port}"
        return f"no route: no VirtualService bound to {refs} routes host {host!r}"

    if view.kind == "gateway":
        described = f"{view.describe()}: {_servers(selected)}"
    elif selected:
        described = f"{view.describe()}: {refs}, {_servers(selected)}"
    else:
        described = f"{view.describe()}: no Gateway selects it"
    return RouteTable(view, described, by_host, default_route=False, refuse=refuse)


def _servers(selected: list[tuple[Gateway, tuple[Server, ...]]]) -> str:
    parts = []
    for _, servers in selected:
        for s in servers:
            hosts = ", ".join(h.describe() for h in s.hosts)
            name = f" ({s.port_name})" if s.port_name else ""
            parts.append(f"server {s.index} port {s.port}{name} hosts {hosts}")
    return "; ".join(parts)


def gateway_bound(vs: VirtualService) -> bool:
    """Whether some rule of ``vs`` is bound to a Gateway (applies at an ingress)."""
    return bool(_names_bound(vs) - {MESH})


def _names_bound(vs: VirtualService) -> set[str]:
    """The gateway names the VirtualService is bound to: its own ``gateways`` (Istio
    indexes a VirtualService by those alone; ``match[].gateways`` only narrow them)."""
    return set(vs.gateways)


def _bound(
    names: set[str], unset_applies: bool, virtual_services: Iterable[VirtualService]
) -> dict[str, list[VirtualService]]:
    """Every VirtualService reduced to what applies where ``names`` are the gateway names
    that bind here and ``unset_applies`` says whether an unset ``gateways`` does, by host,
    in :func:`merge_order`."""

    def applies(listed: tuple[str, ...]) -> bool:
        return unset_applies if not listed else not names.isdisjoint(listed)

    by_host: dict[str, list[VirtualService]] = {}
    for vs in sorted(virtual_services, key=merge_order):
        bound = bind(vs, applies)
        if bound is not None:
            for host in vs.hosts:
                by_host.setdefault(host, []).append(bound)
    return by_host


def _table(
    view: View,
    description: str,
    names: set[str],
    unset_applies: bool,
    virtual_services: Iterable[VirtualService],
) -> RouteTable:
    """The table of a view where VirtualServices are not merged (sidecars, the implicit
    ingress): :meth:`MeshConfig.build` lets at most one apply per host there; a config
    built otherwise gets Istio's sidecar answer, the first in :func:`merge_order`."""
    by_host = {h: found[0] for h, found in _bound(names, unset_applies, virtual_services).items()}
    return RouteTable(view, description, by_host)


def merge_order(vs: VirtualService) -> tuple[int, str, str]:
    """Istio's order among VirtualServices of one host: creation time, then name, then
    namespace. Written files carry no ``creationTimestamp``: Istio's zero time, so first
    and then in name order (objects copied with ``kubectl get -o yaml`` keep theirs)."""
    return _order(vs.metadata.created, vs.metadata.name, vs.metadata.namespace)


def _gateway_order(gw: Gateway) -> tuple[int, str, str]:
    """Istio merges Gateways in the same order (creation time, name, namespace)."""
    return _order(gw.metadata.created, gw.metadata.name, gw.metadata.namespace)


def _order(created: int | None, name: str, namespace: str) -> tuple[int, str, str]:
    # Go's zero time (0001-01-01) precedes every real creation time.
    return (created if created is not None else -(2**63), name, namespace)


def merge(found: Sequence[VirtualService]) -> VirtualService:
    """One VirtualService for a host at an ingress: the rules of each, in order (Istio
    appends each VirtualService's routes to the host's virtual host; first match wins),
    then the catch-all ones moved last, in their order: Istio sorts every Gateway virtual
    host so (SortVHostRoutes), so one VirtualService's catch-all never hides another's
    specific rules."""
    # One with no rule here (all bound elsewhere by match[].gateways) adds no route.
    found = [vs for vs in found if vs.http] or found[:1]
    if len(found) == 1:
        return found[0]
    specific: list[HTTPRoute] = []
    catch_alls: list[HTTPRoute] = []
    owners = []
    for vs in found:
        pieces = []
        for rule in vs.http:
            kept, catch_all = split_catch_all(rule)
            if kept is not None:
                specific.append(kept)
                pieces.append(kept)
            if catch_all is not None:
                catch_alls.append(catch_all)
                pieces.append(catch_all)
        # A rule split in two stays named after the VirtualService that wrote it.
        same = len(pieces) == len(vs.http) and all(
            a is b for a, b in zip(pieces, vs.http, strict=True)
        )
        owners.append(vs if same else replace(vs, http=tuple(pieces)))
    return replace(found[0], http=(*specific, *catch_alls), merged=tuple(owners))


def split_catch_all(rule: HTTPRoute) -> tuple[HTTPRoute | None, HTTPRoute | None]:
    """``rule`` as (its specific match entries, its catch-all ones), either None when it
    has none. Istio's catch-all (IsCatchAllRoute): a rule without ``match``, or an entry
    whose only conditions are ``uri`` prefix ``/`` or regex ``.*`` (and ``port`` or
    ``gateways``, which decide where it applies, not what it matches); headers,
    ``withoutHeaders`` or the model make it specific."""
    if not rule.matches:
        return None, rule
    wide = tuple(m for m in rule.matches if _catches_all(m))
    if not wide:
        return rule, None
    if len(wide) == len(rule.matches):
        return None, rule
    narrow = tuple(m for m in rule.matches if not _catches_all(m))
    return replace(rule, matches=narrow), replace(rule, matches=wide)


def _catches_all(m: MatchRequest) -> bool:
    if m.headers or m.without_headers or m.model is not None:
        return False
    uri = m.uri
    return uri is None or (uri.kind, uri.value) in (("prefix", "/"), ("regex", ".*"))


def mesh_conflict(
    virtual_services: Iterable[VirtualService],
) -> tuple[str, VirtualService, VirtualService] | None:
    """A host that two VirtualServices route in ``mesh`` (host, earlier, later in the
    order given), or None. Istio's sidecars take one and drop the other (IST0109); meshserve
    refuses the config instead."""
    seen: dict[str, VirtualService] = {}
    for vs in virtual_services:
        if bind(vs, lambda listed: not listed or MESH in listed) is None:
            continue
        for host in vs.hosts:
            if host in seen:
                return host, seen[host], vs
            seen[host] = vs
    return None


def bind(vs: VirtualService, applies: Callable[[tuple[str, ...]], bool]) -> VirtualService | None:
    """``vs`` with only the rules and match entries that apply, or None when it does not
    apply here. As in Istio, a VirtualService applies where its own ``gateways`` say
    (Istio indexes it by them alone) and ``match[].gateways`` narrow that per entry
    (:meth:`MeshConfig.build` refuses an entry naming a gateway outside the list, which
    Istio would drop). A rule whose match entries all apply elsewhere is dropped, never
    left matching everything."""
    if not applies(vs.gateways):
        return None
    rules = []
    for rule in vs.http:
        kept = tuple(m for m in rule.matches if not m.gateways or applies(m.gateways))
        if len(kept) == len(rule.matches):
            rules.append(rule)
        elif kept:
            rules.append(replace(rule, matches=kept))
    if len(rules) == len(vs.http) and all(a is b for a, b in zip(rules, vs.http, strict=True)):
        return vs
    return replace(vs, http=tuple(rules))
