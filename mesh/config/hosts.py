"""Mesh host names: short names and cluster FQDNs normalised to one service name."""

from __future__ import annotations

import re

#: The namespace mesh services live in; FQDNs elsewhere are not mesh services.
MESH_NAMESPACE = "meshserve"
#: The cluster domain of FQDNs such as ``inference.meshserve.svc.cluster.local``.
CLUSTER_DOMAIN = "svc.cluster.local"

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def normalise_host(host: str) -> str:
    """The registry service a host names, or raises ``ValueError`` saying why it cannot.

    ``inference``, ``inference.meshserve``, ``inference.meshserve.svc`` and
    ``inference.meshserve.svc.cluster.local`` all name the service ``inference``, the way
    Kubernetes DNS resolves them from inside the mesh namespace. Services are registered
    by short name, so that is the canonical form every lookup uses.
    """
    name = host.strip().lower().rstrip(".")
    if not name:
        raise ValueError("host must not be empty")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label) or len(label) > 63:
            raise ValueError(
                f"host {host!r} is not a DNS name (labels of a-z, 0-9 and '-', "
                "starting and ending with a letter or digit)"
            )
    service, rest = labels[0], ".".join(labels[1:])
    if rest in ("", MESH_NAMESPACE, f"{MESH_NAMESPACE}.svc", f"{MESH_NAMESPACE}.{CLUSTER_DOMAIN}"):
        return service
    raise ValueError(
        f"host {host!r} is not a mesh service: use a short name such as 'inference' or "
        f"'<service>.{MESH_NAMESPACE}.{CLUSTER_DOMAIN}'"
    )


def fqdn(service: str) -> str:
    """The cluster FQDN of a mesh service."""
    return f"{service}.{MESH_NAMESPACE}.{CLUSTER_DOMAIN}"


def external_host(host: str, *, any_name: bool = False) -> str:
    """A host a ServiceEntry may declare: a mesh-form name normalises to its service, any
    other DNS name stays whole (lower-case). A short name always means a mesh service, so
    an external host needs a dot; ``any_name`` lifts that for endpoint addresses resolved
    by DNS (``localhost``)."""
    try:
        return normalise_host(host)
    except ValueError:
        name = host.strip().lower().rstrip(".")
        labels = name.split(".")
        if not name or not all(_LABEL.fullmatch(label) and len(label) <= 63 for label in labels):
            raise
        if len(labels) < 2 and not any_name:  # pragma: no cover - normalise_host took it
            raise
        return name


def is_mesh_host(host: str) -> bool:
    """A normalised host names a mesh service (short) rather than an external name."""
    return "." not in host
