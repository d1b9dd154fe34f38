"""A discovery source whose store answers its first read only when the test says so: what
a starting proxy meets before the registry has answered (tests of listener warming)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from mesh.balance.endpoints import InstanceView
from mesh.routing.discovery import DiscoveryUpdate


class GatedDiscovery:
    """A store that answers its first read only when released."""

    def __init__(self, instances: Iterable[InstanceView]) -> None:
        self.instances = tuple(instances)
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def updates(self) -> AsyncIterator[DiscoveryUpdate]:
        self.asked.set()
        await self.release.wait()
        yield DiscoveryUpdate("reset", self.instances)
        await asyncio.Event().wait()  # then quiet, as a watch with nothing new
