"""A sidecar's outbound: the relay in routing mode, where its worker's calls leave.

The worker dials ``127.0.0.1:outbound_port`` in plaintext; the relay routes each call as
the gateway does (:func:`mesh.routing.decision.decide` over a :class:`GatewayState`) and
dials the chosen peer sidecar over mutual TLS with this workload's certificate. The state
is fed by the same config pipeline as the gateway's (:mod:`mesh.routing.pipeline`): the
sidecar's config directory as the base and the registry's config store over it, so a
``meshserve apply`` written through the store by any gateway reaches every outbound. A
store version that fails validation here is refused and recorded; routing stays on the
last good config. Endpoints come from the registry watch (:mod:`mesh.routing.discovery`).

There is no gRPC server behind this relay: it serves no Admin, health or reflection (a
call for one is answered UNIMPLEMENTED). Fault injection, mirroring and response header
edits are the relay's own, as on the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from mesh.balance.endpoints import EndpointsSnapshot
from mesh.balance.locality import Locality
from mesh.proxy.relay import Relay
from mesh.routing.discovery import (
    INITIAL_FETCH_TIMEOUT_S,
    DiscoverySource,
    EndpointTable,
    follow,
    warm,
)
from mesh.routing.limits import RelayLimits
from mesh.routing.pipeline import ConfigPipeline, VersionStore
from mesh.routing.state import GatewayState
from mesh.server.tasks import cancel_all
from mesh.telemetry.setup import Telemetry

log = logging.getLogger(__name__)
#: The only client is this unit's own worker, on loopback: an abuse cool-off would lock
#: the worker out of the mesh and protect nobody, and a per-source share of a
#: destination's http2MaxRequests would keep it from the whole limit its config sets.
OUTBOUND_LIMITS = RelayLimits(abuse_cool_off=0.0, max_source_share=0.0)


class Outbound:
    """The relay in routing mode on loopback, fed by discovery and the config pipeline."""

    def __init__(
        self,
        discovery: DiscoverySource,
        *,
        config_dir: Path | None = None,
        config_store: VersionStore | None = None,
        tls_context: Callable[[], ssl.SSLContext] | None = None,
        telemetry: Telemetry | None = None,
        reload_interval: float = 1.0,
        discovery_retry: float = 1.0,
        initial_fetch_timeout: float = INITIAL_FETCH_TIMEOUT_S,
        locality: Locality | None = None,
    ) -> None:
        self.state = GatewayState(locality=locality)
        self.pipeline = ConfigPipeline(
            self.state, config_dir=config_dir, store=config_store, reload_interval=reload_interval
        )
        self.discovery = discovery
        self.discovery_retry = discovery_retry
        self.initial_fetch_timeout = initial_fetch_timeout
        #: Set once the first discovery snapshot is in (the listener warms until then).
        self._discovered = asyncio.Event()
        self.table = EndpointTable()
        self._tls_context = tls_context
        self._telemetry = telemetry
        self.relay: Relay | None = None
        #: Where the worker dials (``127.0.0.1:port``), once started.
        self.address: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, port: int) -> str:
        """Loads the config (a bad directory is fatal here, as at the gateway), listens on
        ``127.0.0.1:port`` (0: any free port) and follows discovery and the config sources.
        Returns the address."""
        await self.pipeline.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(
                follow(self.discovery, self.table, self._endpoints, retry=self.discovery_retry)
            )
        ]
        relay = Relay(
            self.state,
            internal_address=None,
            ssl_context=self._tls_context,
            telemetry=self._telemetry,
            limits=OUTBOUND_LIMITS,
        )
        try:
            # The worker's first outbound call after a restart finds the mesh, not nothing.
            await warm(self._discovered, self.initial_fetch_timeout, "sidecar outbound")
            bound = await relay.start("127.0.0.1", port)
        except BaseException:
            await cancel_all(self._tasks)
            raise
        self.relay = relay
        self.address = f"127.0.0.1:{bound}"
        self._tasks.extend(self.pipeline.watchers())
        return self.address

    def _endpoints(self, snapshot: EndpointsSnapshot) -> None:
        self.state.set_endpoints(snapshot)
        self.pipeline.discovered = True
        self._discovered.set()
        if self.relay is not None:
            routable = self.state.clusters.routable  # ServiceEntries' endpoints stay too
            self.relay.pool.retain(
                {e.address for h in routable.hosts() for e in routable.endpoints(h)}
            )

    async def drain(self, grace: float) -> None:
        """Stops following the sources, then drains the relay (in-flight calls finish)."""
        await cancel_all(self._tasks)
        if self.relay is not None:
            await self.relay.drain(grace)
