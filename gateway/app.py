"""Assembles a running gateway: the relay (its data plane), the gRPC server of its own
services (Admin, health, reflection), the discovery loop and config hot reload."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc.aio

from gateway.admin import Admin
from gateway.auth import ADMIN_LOCKED, ClientGuard
from gateway.fleet import FleetServicer
from mesh.balance.endpoints import EndpointsSnapshot
from mesh.config.loader import Document
from mesh.config.resource import DEFAULT_NAMESPACE
from mesh.config.snapshot import MeshConfig
from mesh.config.views import DEFAULT_INGRESS_LABELS, ingress_view
from mesh.proxy.relay import Relay
from mesh.routing.discovery import (
    INITIAL_FETCH_TIMEOUT_S,
    DiscoverySource,
    EndpointTable,
    follow,
    warm,
)
from mesh.routing.limits import RelayLimits
from mesh.routing.methods import MESH_SERVICES
from mesh.routing.pipeline import ConfigPipeline
from mesh.routing.state import GatewayState
from mesh.security.guard import GuardInterceptor
from mesh.security.request_authn import RequestAuthenticator
from mesh.security.workload import Workload
from mesh.server.app import ServerSettings, Service, Serving, start_server
from mesh.server.private import PrivateSocket
from mesh.server.tasks import cancel_all
from mesh.telemetry.interceptors import TelemetryServerInterceptor
from mesh.telemetry.metrics import MeshMetrics
from mesh.telemetry.setup import Telemetry
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from registry.config_store import ConfigStore

log = logging.getLogger(__name__)
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def changed_hosts(old: EndpointsSnapshot, new: EndpointsSnapshot) -> list[str]:
    """Hosts whose membership (addresses, health, weights) differs: their rings are rebuilt."""
    return [
        host
        for host in sorted(set(old.hosts()) | set(new.hosts()))
        if old.endpoints(host) != new.endpoints(host)
    ]


#: The port ``meshserve gateway`` listens on by default, and its Service's port in
#: deploy/k8s: what a Gateway server's ``port.number`` names for it.
DEFAULT_PORT = 8080


def service_port(listen_port: int, explicit: int | None = None) -> int:
    """The port Gateway servers must name for this ingress to apply them.

    Istio's ``port.number`` is the port clients reach the ingress on (a Kubernetes
    Service's port in front of it). That is ``explicit`` when given (``--service-port``),
    else the port the gateway was asked to listen on; ``0`` (any free port: tests and
    ``up --port 0``) has no port of its own to name, so it stands for the default 8080.
    """
    if explicit is not None:
        return explicit
    return listen_port or DEFAULT_PORT


class Gateway:
    """The ingress: routes every mesh method to workers; configured by YAML and the admin API.

    The running config is the directory's resources (the base, ``config_dir``) with the
    latest version in the registry's config store (``config_store``) applied over them,
    resource by resource, as ``kubectl apply`` would: a resource in the store replaces the
    one of the same kind, namespace and name from the directory, others join. Either source
    changing rebuilds the whole config; one that fails validation is recorded as the last
    rejection and the running config stays. With a store, ``ApplyConfig`` writes through
    it (optimistic concurrency on the store version), so every gateway on that store
    converges on the same config.
    """

    def __init__(
        self,
        discovery: DiscoverySource,
        *,
        config_dir: Path | None = None,
        reload_interval: float = 1.0,
        discovery_retry: float = 1.0,
        initial_fetch_timeout: float = INITIAL_FETCH_TIMEOUT_S,
        state: GatewayState | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        channel_credentials: Callable[[], grpc.ChannelCredentials] | None = None,
        metrics: MeshMetrics | None = None,
        config_store: ConfigStore | None = None,
        tls_context: Callable[[], ssl.SSLContext] | None = None,
        telemetry: Telemetry | None = None,
        guard: ClientGuard | None = None,
        relay_limits: RelayLimits | None = None,
        labels: Iterable[tuple[str, str]] = DEFAULT_INGRESS_LABELS,
        service_port: int | None = None,
    ) -> None:
        if channel_credentials is not None and tls_context is None:
            # The relay dials upstreams itself: mutual TLS needs its SSL context.
            raise ValueError(
                "upstream TLS needs tls_context (the relay's client SSL context); "
                "channel_credentials alone is not enough"
            )
        #: The data plane, once started: every client call goes through it.
        self.relay: Relay | None = None
        #: The relay's timeouts and per-source limits (defaults: RelayLimits()).
        self.relay_limits = relay_limits
        self.state = state or GatewayState()
        #: What Gateway resources select this ingress by (``selector``), and the port
        #: their servers must name (None: the listen port; see :func:`service_port`).
        self.labels = tuple(sorted(labels))
        #: The gateway as policy selectors see it: the same labels a Gateway selects by.
        workload = Workload(DEFAULT_NAMESPACE, self.labels)
        self.service_port = service_port
        self.config_store = config_store
        #: Directory, store and admin changes → one validated snapshot (mesh.routing.pipeline).
        self.pipeline = ConfigPipeline(
            self.state, config_dir=config_dir, store=config_store, reload_interval=reload_interval
        )
        self.discovery = discovery
        self.config_dir = config_dir
        self.reload_interval = reload_interval
        #: Extra interceptors of the gRPC server of the gateway's own services (Admin,
        #: health, reflection); mesh calls never reach it (the relay forwards them).
        self.interceptors = tuple(interceptors)
        #: Traces and request metrics: the relay records the calls it forwards, the gRPC
        #: server (outermost interceptor) the ones it serves.
        self.telemetry = telemetry
        #: Client authentication, authorization and rate limits: checked by the relay for
        #: every call it takes, or by the gRPC server when it serves the port itself.
        #: Without an auth file, a guard that leaves the data plane open and refuses Admin
        #: (secure by default: see gateway.auth.ADMIN_LOCKED). The relay never serves Admin
        #: itself (it hands it to the gRPC server), so that guard runs in the gRPC server
        #: only and the relay's hot path stays free of it.
        self.guard = guard if guard is not None else ClientGuard(ADMIN_LOCKED)
        self._guard_in_relay = guard is not None
        self.guard.workload = workload
        if self.guard.policies is None:
            # AuthorizationPolicies selecting the gateway (its labels) apply at the edge
            # whether or not an auth file is given, as Istio evaluates the policies that
            # select its ingress workload: they come from the config pipeline.
            self.guard.policies = lambda: self.state.config.authorization_policies
        self.discovery_retry = discovery_retry
        self.initial_fetch_timeout = initial_fetch_timeout
        #: Set once the first discovery snapshot is in (the listener warms until then).
        self._discovered = asyncio.Event()
        #: RequestAuthentication at the ingress (policies selecting its labels).
        self.authn = RequestAuthenticator(
            lambda: self.state.config.request_authentications, workload
        )
        self.table = EndpointTable()
        # With a context, upstream connections are mutual TLS (to sidecars);
        # ``channel_credentials`` are the same identity for the fleet's gRPC calls.
        self._tls_context = tls_context
        self.metrics = metrics
        self._last_update = time.monotonic()
        self.admin = Admin(
            self.state,
            self.table,
            staleness=lambda: time.monotonic() - self._last_update,
            applier=self.apply_config,
            rollback=self.rollback_config,
        )
        #: Model control, index, statistics and readiness for the whole inference fleet.
        self.fleet = FleetServicer(self.state, credentials=channel_credentials)
        self._tasks: list[asyncio.Task[None]] = []
        #: Set after each discovery update is applied (tests and readiness wait on it).
        self.endpoints_changed = asyncio.Event()

    def load_config(self) -> None:
        """Loads the config directory; at start-up a bad one is fatal (nothing to fall back to)."""
        self.pipeline.load_directory()

    @property
    def store_version(self) -> int:
        """The config store version the running config includes (0: none)."""
        return self.pipeline.store_version

    async def apply_config(self, text: str, *, expected_version: int, dry_run: bool) -> MeshConfig:
        """Admin.ApplyConfig (see ``ConfigPipeline.apply``)."""
        return await self.pipeline.apply(text, expected_version=expected_version, dry_run=dry_run)

    async def rollback_config(
        self, *, expected_version: int, dry_run: bool
    ) -> tuple[MeshConfig, str, list[Document]]:
        """Admin.RollbackConfig (see ``ConfigPipeline.rollback``)."""
        return await self.pipeline.rollback(expected_version=expected_version, dry_run=dry_run)

    def services(self) -> list[Service]:
        def register_admin(server: grpc.aio.Server) -> None:
            admin_pb2_grpc.add_AdminServicer_to_server(self.admin, server)

        # The relay forwards the mesh services; they are listed here so that health and
        # reflection name them (the gateway answers reflection itself). Of the inference
        # service, the fleet's calls are answered here (gateway/fleet.py).
        services = [
            self.fleet.service()
            if name == self.fleet.service().name
            else Service(name, lambda server: None)
            for name in MESH_SERVICES
        ]
        services.append(Service(ADMIN_SERVICE, register_admin))
        return services

    async def start(self, settings: ServerSettings) -> Serving:
        # The ingress view before the first config: the first call is routed as an
        # ingress, never with the sidecars' rules.
        self.state.set_view(
            ingress_view(self.labels, service_port(settings.port, self.service_port))
        )
        await self.pipeline.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_discovery()))
        try:
            await warm(self._discovered, self.initial_fetch_timeout, "gateway")
            serving = await self._start_relayed(settings)
        except BaseException:
            await self.close()
            raise
        self._tasks.append(loop.create_task(self.authn.jwks.run()))
        self._tasks.extend(self.pipeline.watchers())
        serving.on_drain(self.close)
        return serving

    def _server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        # Telemetry outermost: rejected calls are traced and counted too. Behind the relay
        # a configured guard has already admitted the call (checking again would spend a
        # second rate-limit token), so only Admin's scope is checked again here; the
        # default guard (no auth file) runs here whole, the relay running none.
        traced = [TelemetryServerInterceptor(self.telemetry)] if self.telemetry else []
        if self._guard_in_relay:
            guarded = [GuardInterceptor(self.guard.admin_only)]
        else:
            guarded = [GuardInterceptor(self.guard)]
        return [*traced, *guarded, *self.interceptors]

    async def _start_relayed(self, settings: ServerSettings) -> Serving:
        """The gRPC server of the gateway's own services on a private Unix socket, the
        relay on the public port; the relay hands it the calls that are not mesh calls
        (Admin, health, reflection: see mesh/proxy/call_routing.py)."""
        # A Unix socket in a private folder: only this user can reach the server behind
        # the relay (a loopback port would let any local process skip the relay's checks).
        private = PrivateSocket.create("meshserve-gateway-")
        internal = dataclasses.replace(settings, host=private.address, port=0)
        try:
            serving = await start_server(
                internal, self.services(), interceptors=self._server_interceptors()
            )
        except BaseException:
            private.remove()
            raise

        async def remove_folder() -> None:
            private.remove()

        serving.on_drain(remove_folder)
        relay = Relay(
            self.state,
            internal_address=serving.address,
            ssl_context=self._tls_context,
            metrics=self.metrics,
            telemetry=self.telemetry,
            # Without an auth file the guard has nothing to check on the data plane but
            # AuthorizationPolicy: the relay asks it only while a policy selects the gateway,
            # so an unpoliced gateway's hot path stays free of it.
            guard=self.guard.check,
            guard_when=None if self._guard_in_relay else self.guard.enforces_policies,
            authn=self.authn,
            limits=self.relay_limits,
        )
        try:
            port = await relay.start(settings.host, settings.port)
        except OSError:
            await serving.drain(0)
            raise
        self.relay = relay
        serving.before_stop(relay.drain)
        # What callers dial is the relay.
        serving.port, serving.settings = port, settings
        return serving

    async def _watch_discovery(self) -> None:
        """Folds discovery updates into endpoint snapshots, forever (``follow``).

        A source that fails is restarted after a pause; meanwhile the gateway keeps
        routing on its last snapshot (last known good), and the admin API's staleness
        grows so operators can see it.
        """
        await follow(self.discovery, self.table, self._endpoints, retry=self.discovery_retry)

    def _endpoints(self, snapshot: EndpointsSnapshot) -> None:
        if self.metrics is not None:
            for host in changed_hosts(self.state.snapshot, snapshot):
                self.metrics.ring_changed(host)
        self.state.set_endpoints(snapshot)
        self.pipeline.discovered = True
        self._discovered.set()
        routable = self.state.clusters.routable
        addresses = {e.address for h in routable.hosts() for e in routable.endpoints(h)}
        if self.relay is not None:
            self.relay.pool.retain(addresses)
        self._last_update = time.monotonic()
        self.endpoints_changed.set()
        self.endpoints_changed = asyncio.Event()

    async def close(self) -> None:
        await cancel_all(self._tasks)
