"""Which mesh host a gRPC call is for: the :authority when it names one, else the method's package."""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache

from mesh.config.hosts import external_host

#: gRPC packages of each mesh service. The Open Inference Protocol's package is
#: "inference" (Triton's); meshserve's own are versioned ("meshserve.training.v1").
PACKAGE_HOSTS: dict[str, str] = {
    "inference": "inference",
    "meshserve.training": "training",
    "meshserve.data": "data",
}


@lru_cache(maxsize=4096)  # every routed call asks it of the same few paths
def split_method(method: str) -> tuple[str, str] | None:
    """``/pkg.Service/Method`` → ("pkg.Service", "Method"), or None when malformed."""
    if not method.startswith("/"):
        return None
    parts = method[1:].split("/")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


@lru_cache(maxsize=4096)
def host_for_method(method: str) -> str | None:
    """The mesh host a method belongs to by its package, or None for a foreign method."""
    parts = split_method(method)
    if parts is None:
        return None
    package = parts[0].rsplit(".", 1)[0] if "." in parts[0] else ""
    for prefix, host in PACKAGE_HOSTS.items():
        if package == prefix or package.startswith(prefix + "."):
            return host
    return None


def host_for_call(method: str, authority: str, known_hosts: Collection[str]) -> str | None:
    """The host a call is for: an :authority naming a known mesh host wins over the package.

    Clients that dial the gateway by its own address get routed by package; a client
    that sets the authority to ``training`` (or its FQDN) picks the host explicitly.
    """
    if authority:
        name = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
        try:
            # A ServiceEntry's external name stays whole; a mesh name becomes its service.
            host = external_host(name)
        except ValueError:
            host = None
        if host is not None and host in known_hosts:
            return host
    return host_for_method(method)
