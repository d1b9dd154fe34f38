"""What every configuration resource shares: kinds, API versions and metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.config.fields import Node

NETWORKING_API_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
SECURITY_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
API_VERSIONS: dict[str, tuple[str, ...]] = {
    "VirtualService": NETWORKING_API_VERSIONS,
    "DestinationRule": NETWORKING_API_VERSIONS,
    "PeerAuthentication": SECURITY_API_VERSIONS,
    "AuthorizationPolicy": SECURITY_API_VERSIONS,
}
DEFAULT_NAMESPACE = "meshserve"

_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class Metadata:
    """``metadata``: identity plus labels and annotations (where meshserve extensions live)."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    #: The file (or "registry", "admin") the resource was read from; errors name it.
    source: str = "<memory>"

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


def parse_metadata(node: Node, source: str) -> Metadata:
    node.mapping(
        (
            "name",
            "namespace",
            "labels",
            "annotations",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
        ),
        required=("name",),
    )
    name = node.child("name").string()
    if not _DNS_1123.fullmatch(name) or len(name) > 253:
        node.child("name").fail(f"must be a lower-case DNS-1123 name, got {name!r}")
    namespace_node = node.child("namespace")
    namespace = DEFAULT_NAMESPACE if namespace_node.value is None else namespace_node.string()
    return Metadata(
        name=name,
        namespace=namespace,
        labels=tuple(sorted(node.child("labels").string_map().items())),
        annotations=tuple(sorted(node.child("annotations").string_map().items())),
        source=source,
    )
