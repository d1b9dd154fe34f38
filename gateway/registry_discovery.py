"""Registry discovery lives in ``registry.discovery`` (shared with the sidecar's outbound);
re-exported here for the gateway's callers."""

from registry.discovery import RegisteredInstance, RegistryDiscovery

__all__ = ["RegisteredInstance", "RegistryDiscovery"]
