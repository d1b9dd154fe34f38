"""What every configuration resource shares: kinds, API versions and metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from mesh.config.fields import Node
from mesh.config.hosts import CLUSTER_DOMAIN, MESH_NAMESPACE, external_host

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
    "RequestAuthentication": SECURITY_API_VERSIONS,
    "ServiceEntry": NETWORKING_API_VERSIONS,
    "Gateway": NETWORKING_API_VERSIONS,
}
DEFAULT_NAMESPACE = "meshserve"
#: metadata the Kubernetes API server writes; a copied object keeps it, and it routes nothing.
SERVER_METADATA = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "selfLink",
    "generateName",
)

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
    #: ``creationTimestamp`` in whole seconds since the epoch (None: not given). Routing
    #: ignores it except where Istio orders by it: VirtualServices (and Gateways) merged at
    #: an ingress (:func:`mesh.config.views.merge_order`).
    created: int | None = None

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


def parse_metadata(node: Node, source: str) -> Metadata:
    node.mapping(
        (
            "name",
            "namespace",
            "labels",
            "annotations",
            # What the API server adds (``kubectl get -o yaml``): accepted, ignored.
            *SERVER_METADATA,
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
        created=_created(node.child("creationTimestamp")),
    )


_EXAMPLE = "2024-05-01T12:00:00Z"


def _created(node: Node) -> int | None:
    """``creationTimestamp``: RFC 3339 as the API server writes it (text: the loader keeps
    YAML times as strings, as Kubernetes does; a ``datetime`` from a tree built in code);
    ``null`` as ``kubectl`` writes for an unsaved object. Istio compares it in whole
    seconds, so it is kept that way."""
    value = node.value
    if value is None:
        return None
    if isinstance(value, str):
        text = value
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            value = None
        if value is None or ":" not in text:  # fromisoformat takes a bare date too
            node.fail(f"{text!r} is not an RFC 3339 time such as '{_EXAMPLE}'")
        if value.tzinfo is None:  # Kubernetes parses RFC 3339, which needs the offset
            node.fail(f"{text!r} has no UTC offset ('Z' or '+01:00'), as RFC 3339 needs")
    if not isinstance(value, datetime):
        kind = "a date without a time" if isinstance(value, date) else type(value).__name__
        node.fail(f"must be an RFC 3339 time such as '{_EXAMPLE}', got {kind}")
    if value.tzinfo is None:  # a tree built in code: YAML's unzoned times are UTC
        value = value.replace(tzinfo=UTC)
    try:
        return int(value.timestamp())
    except (OverflowError, ValueError, OSError):  # beyond what a platform's time can say
        node.fail(f"{value.isoformat()} is out of range")


def resource_host(node: Node, namespace: str) -> str:
    """A host as Istio reads it in a resource of ``namespace``: a short name is a service
    of that namespace, so it is a mesh service only in the mesh's own namespace. A name
    outside the mesh is kept whole: :meth:`MeshConfig.build` refuses it unless a
    ServiceEntry declares it."""
    text = node.string()
    if "." not in text.strip().rstrip(".") and namespace != MESH_NAMESPACE:
        node.fail(
            f"short host {text!r} in namespace {namespace!r} means "
            f"{text}.{namespace}.{CLUSTER_DOMAIN} (as in Istio), which is not a mesh service: "
            f"use {text}.{MESH_NAMESPACE}.{CLUSTER_DOMAIN} or metadata.namespace {MESH_NAMESPACE}"
        )
    try:
        return external_host(text)
    except ValueError as exc:
        node.fail(str(exc))


def export_to(node: Node, namespace: str) -> tuple[str, ...]:
    """``exportTo``: every mesh service lives in namespace meshserve, so a resource works
    as Istio documents it exactly when it is visible there (``*``, the meshserve
    namespace, or ``.`` in a resource of that namespace). Any other list would hide it
    from the mesh in Istio, which meshserve does not model: refused, not ignored."""
    entries = node.string_list()
    visible = {"*", MESH_NAMESPACE} | ({"."} if namespace == MESH_NAMESPACE else set())
    if entries and not visible & set(entries):
        node.fail(
            f"exportTo {list(entries)} hides the resource from namespace {MESH_NAMESPACE!r}, "
            "where every mesh service lives; meshserve does not support that (use '*' or "
            f"'{MESH_NAMESPACE}', or leave exportTo out)"
        )
    return entries
