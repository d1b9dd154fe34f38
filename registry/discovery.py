"""Discovery from the registry: Elasticsearch watch updates as routing's DiscoveryUpdates
(``mesh.routing.discovery``), for the gateway and the sidecar's outbound alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from mesh.routing.discovery import DiscoveryUpdate, UpdateKind
from registry.instances import Instance, Load, ModelRef
from registry.watch import Discovery


@dataclass(frozen=True)
class RegisteredInstance:
    """A registry ``Instance`` seen through ``InstanceView`` (``id`` is its instance id)."""

    service: str
    id: str
    address: str
    labels: Mapping[str, str]
    status: str
    #: What the instance's sidecar last published (the worker's own report, when it has one).
    load: Load | None
    #: Model versions the worker holds in memory (``ModelRef``: model, version).
    models: tuple[ModelRef, ...] = ()

    @classmethod
    def of(cls, instance: Instance) -> RegisteredInstance:
        return cls(
            service=instance.service,
            id=instance.instance_id,
            address=instance.address,
            labels=instance.labels,
            status=str(instance.status),
            load=instance.load,
            models=instance.models,
        )


class RegistryDiscovery:
    """A ``DiscoverySource`` over a registry watcher (``store.watcher()``).

    The watcher keeps its last known good membership through store outages and emits a
    RESET first, so the discovery contract (reset first, stay quiet while down) holds.
    """

    def __init__(self, watcher: Discovery) -> None:
        self._watcher = watcher

    async def updates(self) -> AsyncIterator[DiscoveryUpdate]:
        async for update in self._watcher.updates():
            kind: UpdateKind = update.kind.value
            yield DiscoveryUpdate(kind, tuple(RegisteredInstance.of(i) for i in update.instances))
