"""Discovery lives in the mesh core (``mesh.routing.discovery``), shared with the sidecar's
outbound; re-exported here for the gateway's callers."""

from mesh.routing.discovery import (
    DiscoverySource,
    DiscoveryUpdate,
    EndpointTable,
    StaticDiscovery,
    StaticInstance,
    StaticLoad,
    UpdateKind,
    follow,
    parse_static,
)

__all__ = [
    "DiscoverySource",
    "DiscoveryUpdate",
    "EndpointTable",
    "StaticDiscovery",
    "StaticInstance",
    "StaticLoad",
    "UpdateKind",
    "follow",
    "parse_static",
]
