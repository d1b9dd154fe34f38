"""What every configuration resource shares: kinds, API versions and metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    )


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
