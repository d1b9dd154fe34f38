"""MeshConfig: one immutable, cross-validated snapshot of every routing resource."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mesh.balance.endpoints import Endpoint, EndpointsSnapshot
from mesh.config.destination_rule import DestinationRule
from mesh.config.fields import ConfigError
from mesh.config.gateway import MESH, Gateway
from mesh.config.hosts import CLUSTER_DOMAIN, MESH_NAMESPACE, is_mesh_host
from mesh.config.loader import Document, load_path, parse_yaml
from mesh.config.request_authn import RequestAuthentication
from mesh.config.security import AuthorizationPolicy, PeerAuthentication
from mesh.config.service_entry import ServiceEntry
from mesh.config.views import (
    RouteTable,
    View,
    gateway_bound,
    merge_order,
    mesh_conflict,
    route_table,
)
from mesh.config.virtual_service import Destination, VirtualService


@dataclass(frozen=True)
class MeshConfig:
    """All resources of one configuration version, indexed by host.

    Built only through :meth:`build`, which rejects a set of resources that refer to
    each other inconsistently, so routing code can trust every reference it follows.
    """

    version: int
    source: str
    documents: tuple[Document, ...]
    #: Every VirtualService naming a host, by host, in Istio's merge order
    #: (:func:`~mesh.config.views.merge_order`); :meth:`routes` says which applies where.
    virtual_services: dict[str, tuple[VirtualService, ...]] = field(default_factory=dict)
    destination_rules: dict[str, DestinationRule] = field(default_factory=dict)
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    #: ServiceEntries by each host they declare.
    service_entries: dict[str, ServiceEntry] = field(default_factory=dict)
    #: Gateways by ``namespace/name`` (what VirtualService ``gateways`` name).
    gateways: dict[str, Gateway] = field(default_factory=dict)
    #: Route tables already built, by view (a snapshot is immutable, so they stay valid).
    _routes: dict[View, RouteTable] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, documents: Sequence[Document], *, version: int, source: str) -> MeshConfig:
        seen: dict[tuple[str, str, str], Document] = {}
        ordered: list[VirtualService] = []
        destination_rules: dict[str, DestinationRule] = {}
        peer: list[PeerAuthentication] = []
        authz: list[AuthorizationPolicy] = []
        authn: list[RequestAuthentication] = []
        entries: dict[str, ServiceEntry] = {}
        gateways: dict[str, Gateway] = {}
        for doc in documents:
            r = doc.resource
            md = r.metadata
            key = (doc.kind, md.namespace, md.name)
            if key in seen:
                raise ConfigError(
                    f"{md.source}: {r.ref}: metadata.name: duplicate of the resource in "
                    f"{seen[key].resource.metadata.source}"
                )
            seen[key] = doc
            if isinstance(r, VirtualService):
                ordered.append(r)
            elif isinstance(r, DestinationRule):
                if r.host in destination_rules:
                    other_dr = destination_rules[r.host]
                    raise ConfigError(
                        f"{md.source}: {r.ref}: spec.host: host {r.host!r} already has "
                        f"{other_dr.ref} ({other_dr.metadata.source})"
                    )
                destination_rules[r.host] = r
            elif isinstance(r, ServiceEntry):
                for i, host in enumerate(r.hosts):
                    if host in entries:
                        other_se = entries[host]
                        raise ConfigError(
                            f"{md.source}: {r.ref}: spec.hosts[{i}]: host {host!r} is already "
                            f"declared by {other_se.ref} ({other_se.metadata.source})"
                        )
                    entries[host] = r
            elif isinstance(r, Gateway):
                gateways[r.qualified] = r
            elif isinstance(r, PeerAuthentication):
                peer.append(r)
            elif isinstance(r, RequestAuthentication):
                authn.append(r)
            else:
                authz.append(r)
        _check_mesh_conflicts(ordered)
        _check_gateway_merges(ordered)
        virtual_services: dict[str, tuple[VirtualService, ...]] = {}
        for vs in sorted(ordered, key=merge_order):
            for host in vs.hosts:
                virtual_services[host] = (*virtual_services.get(host, ()), vs)
        config = cls(
            version=version,
            source=source,
            documents=tuple(documents),
            virtual_services=virtual_services,
            destination_rules=destination_rules,
            peer_authentications=tuple(peer),
            authorization_policies=tuple(authz),
            request_authentications=tuple(authn),
            service_entries=entries,
            gateways=gateways,
        )
        config._check_gateway_names()
        config._check_hosts()
        config._check_references()
        return config

    def _check_gateway_names(self) -> None:
        """Every name in ``gateways`` is ``mesh`` or a Gateway of this config: a rule bound
        to a missing Gateway would never apply anywhere, which is never what was meant."""
        for vs in self.virtual_service_list:
            named = [(f"spec.gateways[{i}]", n) for i, n in enumerate(vs.gateways)]
            for rule in vs.http:
                for j, m in enumerate(rule.matches):
                    path = f"spec.http[{rule.index}].match[{j}].gateways"
                    named += [(f"{path}[{k}]", n) for k, n in enumerate(m.gateways)]
            for path, name in named:
                if name != MESH and name not in self.gateways:
                    known = ", ".join(sorted(self.gateways)) or "none"
                    raise ConfigError(
                        f"{vs.metadata.source}: {vs.ref}: {path}: gateway {name!r} names no "
                        f"Gateway in the config (Gateways: {known}; 'mesh' means the sidecars)"
                    )
            # Istio finds a VirtualService through its own gateways only (unset: mesh), so a
            # match entry's gateway outside them never applies: Istio drops it silently.
            bound = set(vs.gateways or (MESH,))
            for path, name in named[len(vs.gateways) :]:
                if name not in bound:
                    raise ConfigError(
                        f"{vs.metadata.source}: {vs.ref}: {path}: gateway {name!r} is not among "
                        f"the VirtualService's gateways ({', '.join(sorted(bound))}"
                        f"{'' if vs.gateways else ': unset means mesh'}); Istio applies a "
                        "VirtualService only where its own gateways say, and match gateways "
                        "only narrow that, so this entry would never apply there: add it to "
                        "spec.gateways"
                    )

    def _check_hosts(self) -> None:
        """A host outside the mesh is routable only when a ServiceEntry declares it."""
        for vs in self.virtual_service_list:
            # Istio's ingress examples name the client's public name here (the :authority,
            # httpbin.example.com) and route it to a service; meshserve routes a call by
            # the mesh service it is for, so the refusal says what to write instead.
            hint = (
                "; at a Gateway a call is routed by the mesh service it is for (its "
                ":authority or gRPC package), so name that service here, not a public name"
                if gateway_bound(vs)
                else ""
            )
            for i, host in enumerate(vs.hosts):
                self._check_host(vs.metadata.source, vs.ref, f"spec.hosts[{i}]", host, hint)
            for rule in vs.http:
                for j, rd in enumerate(rule.route):
                    path = f"spec.http[{rule.index}].route[{j}].destination.host"
                    self._check_host(vs.metadata.source, vs.ref, path, rd.destination.host)
                if rule.mirror is not None:
                    path = f"spec.http[{rule.index}].mirror.host"
                    self._check_host(vs.metadata.source, vs.ref, path, rule.mirror.host)
        for dr in self.destination_rules.values():
            self._check_host(dr.metadata.source, dr.ref, "spec.host", dr.host)
            if dr.has_port_settings and dr.host not in self.service_entries:
                # A registered service has no service port (each instance registers its
                # own address), so a port-level policy could never apply: refused.
                raise ConfigError(
                    f"{dr.metadata.source}: {dr.ref}: portLevelSettings: host {dr.host!r} "
                    "has no service port (registered services have none); port-level "
                    "settings apply to a ServiceEntry host, at the port it declares"
                )

    def _check_host(self, source: str, ref: str, path: str, host: str, hint: str = "") -> None:
        if is_mesh_host(host) or host in self.service_entries:
            return
        raise ConfigError(
            f"{source}: {ref}: {path}: host {host!r} is not a mesh service: use a short name "
            f"such as 'inference' or '<service>.{MESH_NAMESPACE}.{CLUSTER_DOMAIN}', or "
            f"declare it with a ServiceEntry{hint}"
        )

    def _check_references(self) -> None:
        for vs in self.virtual_service_list:
            for rule in vs.http:
                for j, rd in enumerate(rule.route):
                    self._check_destination(
                        vs, f"spec.http[{rule.index}].route[{j}].destination", rd.destination
                    )
                if rule.mirror is not None:
                    self._check_destination(vs, f"spec.http[{rule.index}].mirror", rule.mirror)

    def _check_destination(self, vs: VirtualService, path: str, dest: Destination) -> None:
        if dest.subset is None:
            return
        prefix = f"{vs.metadata.source}: {vs.ref}: {path}.subset"
        dr = self.destination_rules.get(dest.host)
        if dr is None:
            raise ConfigError(
                f"{prefix}: subset {dest.subset!r} of host {dest.host!r} needs a "
                "DestinationRule for that host, and there is none"
            )
        if dr.subset(dest.subset) is None:
            known = ", ".join(s.name for s in dr.subsets) or "none"
            raise ConfigError(
                f"{prefix}: subset {dest.subset!r} is not defined by {dr.ref} "
                f"({dr.metadata.source}) for host {dest.host!r} (subsets: {known})"
            )

    def merged(self, documents: Sequence[Document], *, version: int, source: str) -> MeshConfig:
        """A new snapshot: ``documents`` replace resources of the same kind and name, or join.

        This is what applying a file means (as ``kubectl apply``): a canary's
        VirtualService replaces the running one and leaves the DestinationRules alone.
        """
        incoming = {
            (d.kind, d.resource.metadata.namespace, d.resource.metadata.name) for d in documents
        }
        kept = [
            d
            for d in self.documents
            if (d.kind, d.resource.metadata.namespace, d.resource.metadata.name) not in incoming
        ]
        return MeshConfig.build([*kept, *documents], version=version, source=source)

    # -- lookups --------------------------------------------------------------------------

    @functools.cached_property
    def virtual_service_list(self) -> tuple[VirtualService, ...]:
        """Every VirtualService once, in Istio's merge order."""
        unique = {id(v): v for found in self.virtual_services.values() for v in found}
        return tuple(sorted(unique.values(), key=merge_order))

    def virtual_services_for(self, host: str) -> tuple[VirtualService, ...]:
        """Every VirtualService naming ``host``, whatever it is bound to (:meth:`routes`
        says which applies where)."""
        return self.virtual_services.get(host, ())

    def routes(self, view: View) -> RouteTable:
        """The rules that apply in ``view`` (built once per snapshot and view). Raises
        ``KeyError`` for a Gateway view whose Gateway this config does not hold."""
        found = self._routes.get(view)
        if found is None:
            found = self._routes[view] = route_table(view, self.gateways, self.virtual_service_list)
        return found

    def destination_rule(self, host: str) -> DestinationRule | None:
        return self.destination_rules.get(host)

    def service_entry(self, host: str) -> ServiceEntry | None:
        return self.service_entries.get(host)

    def entry_endpoints(self) -> dict[str, tuple[Endpoint, ...]]:
        """The endpoints ServiceEntries list, by host."""
        return {host: se.endpoints for host, se in self.service_entries.items()}

    def routable(self, snapshot: EndpointsSnapshot) -> EndpointsSnapshot:
        """``snapshot`` (the registry's endpoints) plus the ServiceEntries' endpoints: a
        host both declare gets both, as Istio merges a ServiceEntry into a service."""
        if not self.service_entries:
            return snapshot
        by_host = {h: list(snapshot.endpoints(h)) for h in snapshot.hosts()}
        for host, endpoints in self.entry_endpoints().items():
            by_host.setdefault(host, []).extend(endpoints)
        return EndpointsSnapshot(by_host, snapshot.generation)

    def refs(self) -> list[str]:
        return [d.ref for d in self.documents]


def _check_mesh_conflicts(ordered: Sequence[VirtualService]) -> None:
    """At most one VirtualService per host applies in ``mesh``: Istio's sidecars keep one
    and drop the other (IST0109), so a second is refused, naming both. At Gateways they
    are merged (:func:`~mesh.config.views.merge`)."""
    found = mesh_conflict(ordered)
    if found is None:
        return
    host, first, second = found
    md = second.metadata
    raise ConfigError(
        f"{md.source}: {second.ref}: spec.hosts[{second.hosts.index(host)}]: host {host!r} "
        f"is already routed by {first.ref} ({first.metadata.source}) in the mesh view "
        "(sidecars): both apply there (gateways unset or listing 'mesh'), and Istio merges "
        "VirtualServices of one host only at Gateways; bind one of them to a Gateway only, "
        "or merge their rules into one"
    )


def _check_gateway_merges(ordered: Sequence[VirtualService]) -> None:
    """VirtualServices of one host merged at a Gateway must all be public: Istio puts those
    exported only to the ingress' own namespace first, an order meshserve does not model."""
    by_host: dict[str, list[VirtualService]] = {}
    for vs in ordered:
        if gateway_bound(vs):
            for host in vs.hosts:
                by_host.setdefault(host, []).append(vs)
    for host, found in by_host.items():
        scoped = [vs for vs in found if vs.export_to and "*" not in vs.export_to]
        if len(found) > 1 and scoped:
            other = next(vs for vs in found if vs is not scoped[0])
            md = scoped[0].metadata
            raise ConfigError(
                f"{md.source}: {scoped[0].ref}: spec.exportTo: host {host!r} is also routed "
                f"at a Gateway by {other.ref} ({other.metadata.source}), and Istio orders "
                "VirtualServices merged at an ingress by whether they are exported to its "
                "namespace, which meshserve does not model: leave exportTo out or use '*'"
            )


EMPTY = MeshConfig(version=0, source="<none>", documents=())


def config_from_yaml(text: str, *, source: str, version: int = 1) -> MeshConfig:
    return MeshConfig.build(parse_yaml(text, source), version=version, source=source)


def config_from_path(path: Path | str, *, version: int = 1) -> MeshConfig:
    return MeshConfig.build(load_path(path), version=version, source=str(path))
