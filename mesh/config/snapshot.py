"""MeshConfig: one immutable, cross-validated snapshot of every routing resource."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mesh.config.destination_rule import DestinationRule
from mesh.config.fields import ConfigError
from mesh.config.loader import Document, load_path, parse_yaml
from mesh.config.security import AuthorizationPolicy, PeerAuthentication
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
    virtual_services: dict[str, VirtualService] = field(default_factory=dict)
    destination_rules: dict[str, DestinationRule] = field(default_factory=dict)
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()

    @classmethod
    def build(cls, documents: Sequence[Document], *, version: int, source: str) -> MeshConfig:
        seen: dict[tuple[str, str, str], Document] = {}
        virtual_services: dict[str, VirtualService] = {}
        destination_rules: dict[str, DestinationRule] = {}
        peer: list[PeerAuthentication] = []
        authz: list[AuthorizationPolicy] = []
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
                for i, host in enumerate(r.hosts):
                    if host in virtual_services:
                        other = virtual_services[host]
                        raise ConfigError(
                            f"{md.source}: {r.ref}: spec.hosts[{i}]: host {host!r} is already "
                            f"routed by {other.ref} ({other.metadata.source})"
                        )
                    virtual_services[host] = r
            elif isinstance(r, DestinationRule):
                if r.host in destination_rules:
                    other_dr = destination_rules[r.host]
                    raise ConfigError(
                        f"{md.source}: {r.ref}: spec.host: host {r.host!r} already has "
                        f"{other_dr.ref} ({other_dr.metadata.source})"
                    )
                destination_rules[r.host] = r
            elif isinstance(r, PeerAuthentication):
                peer.append(r)
            else:
                authz.append(r)
        config = cls(
            version=version,
            source=source,
            documents=tuple(documents),
            virtual_services=virtual_services,
            destination_rules=destination_rules,
            peer_authentications=tuple(peer),
            authorization_policies=tuple(authz),
        )
        config._check_references()
        return config

    def _check_references(self) -> None:
        for vs in {id(v): v for v in self.virtual_services.values()}.values():
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

    def virtual_service(self, host: str) -> VirtualService | None:
        return self.virtual_services.get(host)

    def destination_rule(self, host: str) -> DestinationRule | None:
        return self.destination_rules.get(host)

    def refs(self) -> list[str]:
        return [d.ref for d in self.documents]


EMPTY = MeshConfig(version=0, source="<none>", documents=())


def config_from_yaml(text: str, *, source: str, version: int = 1) -> MeshConfig:
    return MeshConfig.build(parse_yaml(text, source), version=version, source=source)


def config_from_path(path: Path | str, *, version: int = 1) -> MeshConfig:
    return MeshConfig.build(load_path(path), version=version, source=str(path))
