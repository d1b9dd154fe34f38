"""The gateway's routing state: running config, last rejection, endpoints, clusters."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.balance.cluster import ClusterMap
from mesh.balance.endpoints import EndpointsSnapshot
from mesh.balance.load import LoadTracker
from mesh.balance.locality import Locality
from mesh.config.fields import ConfigError
from mesh.config.loader import Document
from mesh.config.snapshot import EMPTY, MeshConfig
from mesh.config.views import MESH_VIEW, View
from mesh.errors import Aborted
from mesh.routing.decision import RequestInfo, RouteDecision, decide


@dataclass(frozen=True)
class Rejection:
    source: str
    error: str
    at: float


class GatewayState:
    """Everything routing reads, replaced whole on each change (last known good).

    Config and endpoints change by swapping in a new :class:`ClusterMap`; a decision
    in progress keeps the map it started with. A config that fails validation is
    recorded as the last rejection and changes nothing else.
    """

    def __init__(
        self,
        config: MeshConfig = EMPTY,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        locality: Locality | None = None,
        view: View = MESH_VIEW,
    ) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self.tracker = LoadTracker()
        #: This proxy's locality (localityLbSetting); None: unknown, locality balancing off.
        self.clusters = ClusterMap(
            config, EndpointsSnapshot({}), self.tracker, clock, locality=locality, view=view
        )
        self.applied_at = wall_clock()
        self.last_rejection: Rejection | None = None

    @property
    def config(self) -> MeshConfig:
        return self.clusters.config

    @property
    def snapshot(self) -> EndpointsSnapshot:
        return self.clusters.snapshot

    @property
    def view(self) -> View:
        return self.clusters.view

    def decide(
        self, request: RequestInfo, *, explain: bool = False, view: View | None = None
    ) -> RouteDecision:
        """Routes ``request`` here, or (``route explain``) as ``view`` would route it.
        Raises ``KeyError`` for a Gateway view the running config does not hold."""
        clusters = self.clusters
        if view is not None and view != clusters.view:
            # Explain only: a map of its own (rings built anew), never installed.
            clusters = ClusterMap(
                self.config, self.snapshot, LoadTracker(), self.clock, clusters, view=view
            )
        return decide(clusters, request, self.rng, explain=explain)

    def set_view(self, view: View) -> None:
        """Where this proxy routes: the gateway sets its ingress view once it listens."""
        self.clusters = ClusterMap(
            self.config, self.snapshot, self.tracker, self.clock, self.clusters, view=view
        )

    def set_endpoints(self, snapshot: EndpointsSnapshot) -> None:
        self.clusters = ClusterMap(
            self.config, snapshot, self.tracker, self.clock, previous=self.clusters
        )

    def _install(self, config: MeshConfig) -> None:
        self.clusters = ClusterMap(
            config, self.snapshot, self.tracker, self.clock, previous=self.clusters
        )
        self.applied_at = self.wall_clock()

    def apply_whole(self, config: MeshConfig) -> None:
        """Installs an already validated config as the running one."""
        self._install(config)

    def reject(self, source: str, error: str) -> None:
        """Records a config that failed validation; the running one stays."""
        self.last_rejection = Rejection(source, error, self.wall_clock())

    def apply(
        self,
        documents: Sequence[Document] | Callable[[], Sequence[Document]],
        *,
        source: str,
        expected_version: int = 0,
        dry_run: bool = False,
    ) -> MeshConfig:
        """Applies resources over the running config (``kubectl apply``); raises on rejection."""
        if expected_version and expected_version != self.config.version:
            raise Aborted(
                f"config version is {self.config.version}, not the expected {expected_version}"
            )
        try:
            docs = documents() if callable(documents) else documents
            config = self.config.merged(docs, version=self.config.version + 1, source=source)
        except ConfigError as exc:
            if not dry_run:
                self.reject(source, exc.message)
            raise
        if not dry_run:
            self._install(config)
        return config
