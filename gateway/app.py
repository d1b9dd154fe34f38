"""Assembles a running gateway: the relay (its data plane), the gRPC server of its own
services (Admin, health, reflection), the discovery loop and config hot reload."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc.aio

from gateway.admin import Admin
from gateway.auth import ADMIN_LOCKED, ClientGuard
from gateway.discovery import DiscoverySource, EndpointTable
from mesh.balance.endpoints import EndpointsSnapshot
from mesh.config.fields import ConfigError
from mesh.config.loader import Document, dump_yaml, fingerprint, load_path, parse_yaml
from mesh.config.snapshot import EMPTY, MeshConfig
from mesh.errors import Aborted, FailedPrecondition
from mesh.proxy.relay import Relay
from mesh.routing.admission import check_admission
from mesh.routing.limits import RelayLimits
from mesh.routing.methods import MESH_SERVICES
from mesh.routing.state import GatewayState
from mesh.security.guard import GuardInterceptor
from mesh.server.app import ServerSettings, Service, Serving, start_server
from mesh.server.private import PrivateSocket
from mesh.telemetry.interceptors import TelemetryServerInterceptor
from mesh.telemetry.metrics import MeshMetrics
from mesh.telemetry.setup import Telemetry
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc
from registry.config_store import ConfigStore, ConfigVersion

log = logging.getLogger(__name__)
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def validate_documents(text: str) -> None:
    """The config store's validator: every resource parses (cross-references are checked
    by the gateway against the directory base before it writes)."""
    parse_yaml(text, "config store")


def _same_resource(a: Document, b: Document) -> bool:
    ra, rb = a.resource.metadata, b.resource.metadata
    return (a.kind, ra.namespace, ra.name) == (b.kind, rb.namespace, rb.name)


def changed_hosts(old: EndpointsSnapshot, new: EndpointsSnapshot) -> list[str]:
    """Hosts whose membership (addresses, health, weights) differs: their rings are rebuilt."""
    return [
        host
        for host in sorted(set(old.hosts()) | set(new.hosts()))
        if old.endpoints(host) != new.endpoints(host)
    ]


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
        state: GatewayState | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        channel_credentials: Callable[[], grpc.ChannelCredentials] | None = None,
        metrics: MeshMetrics | None = None,
        config_store: ConfigStore | None = None,
        tls_context: Callable[[], ssl.SSLContext] | None = None,
        telemetry: Telemetry | None = None,
        guard: ClientGuard | None = None,
        relay_limits: RelayLimits | None = None,
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
        self.config_store = config_store
        #: The directory's resources, and the store version laid over them (None: none).
        self._base: list[Document] = []
        self._overlay: ConfigVersion | None = None
        self._overlay_docs: list[Document] = []
        #: The newest store version read, installed or rejected (what a write builds on).
        self._store_seen = 0
        #: Without a store: the overlay before the last admin change (what rollback restores).
        self._previous_overlay: list[Document] | None = None
        #: Whether discovery has reported once: until then registrations are unknown.
        self._discovered = False
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
        self.discovery_retry = discovery_retry
        self.table = EndpointTable()
        # With a context, upstream connections are mutual TLS (to sidecars).
        # ``channel_credentials`` is accepted beside it for callers that still pass both.
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
        self._tasks: list[asyncio.Task[None]] = []
        self._fingerprint: tuple[tuple[str, int, int], ...] = ()
        #: Set after each discovery update is applied (tests and readiness wait on it).
        self.endpoints_changed = asyncio.Event()

    def load_config(self) -> None:
        """Loads the config directory; at start-up a bad one is fatal (nothing to fall back to)."""
        if self.config_dir is None:
            return
        directory = self.config_dir
        self._fingerprint = fingerprint(directory)
        self._base = load_path(directory)
        self.state.apply_whole(self._build(self._base, self._overlay_docs, self._overlay))

    @property
    def store_version(self) -> int:
        """The config store version the running config includes (0: none)."""
        return self._overlay.version if self._overlay is not None else 0

    def _build(
        self, base: list[Document], overlay: list[Document], stored: ConfigVersion | None
    ) -> MeshConfig:
        """Base then overlay, validated as a whole and against what the mesh knows
        (``mesh.routing.admission``); raises ``ConfigError``.

        Every way a config arrives (directory, store, admin apply, rollback) comes through
        here, so no source can install a config that strands a served host.
        """
        parts = [str(self.config_dir)] if self.config_dir is not None else []
        if stored is not None:
            parts.append(f"store {stored.name!r} v{stored.version}")
        elif overlay:
            parts.append("admin")  # applied in memory (no store)
        config = EMPTY.merged(base, version=0, source="").merged(
            overlay, version=self.state.config.version + 1, source=" + ".join(parts) or "<none>"
        )
        endpoints = self.state.snapshot if self._discovered else None
        check_admission(config, self.state.config, endpoints)
        return config

    async def _load_store(self) -> None:
        """At start-up: lays the store's latest version over the directory.

        A stored version that does not validate here (say, it names a subset only another
        gateway's directory defines) is a rejection, not a crash: the base keeps routing.
        """
        assert self.config_store is not None
        current = await self.config_store.current()
        if current is not None:
            self._store_seen = current.version
            self._take_store_version(current)

    def _take_store_version(self, stored: ConfigVersion) -> None:
        source = f"store {stored.name!r} v{stored.version}"
        try:
            docs = parse_yaml(stored.yaml, source)
            config = self._build(self._base, docs, stored)
        except ConfigError as exc:
            self.state.reject(source, exc.message)
            log.error(
                "config rejected, still routing on version %d: %s",
                self.state.config.version,
                exc.message,
            )
            return
        self._overlay, self._overlay_docs = stored, docs
        self.state.apply_whole(config)
        log.info("config version %d: %s", config.version, config.source)

    def _expect(self, expected_version: int) -> None:
        if expected_version and expected_version != self.state.config.version:
            raise Aborted(
                f"config version is {self.state.config.version}, "
                f"not the expected {expected_version}"
            )

    async def apply_config(self, text: str, *, expected_version: int, dry_run: bool) -> MeshConfig:
        """Admin.ApplyConfig: validate here, then write through the store (if any).

        ``expected_version`` is the running config version the caller read (0: any); the
        store write itself expects the store version the running config includes, so of
        two gateways applying at once, one wins and the other gets ``Aborted``. Without a
        store the change lives in this gateway's memory (lost on restart).
        """
        source = "admin"
        self._expect(expected_version)
        try:
            incoming = parse_yaml(text, source)
            overlay = [
                d for d in self._overlay_docs if not any(_same_resource(d, n) for n in incoming)
            ]
            overlay.extend(incoming)
            config = self._build(self._base, overlay, self._overlay)
        except ConfigError as exc:
            if not dry_run:
                self.state.reject(source, exc.message)
            raise
        if dry_run:
            return config
        return await self._install_overlay(overlay, config, applied_by="gateway admin")

    async def _install_overlay(
        self, overlay: list[Document], config: MeshConfig, *, applied_by: str
    ) -> MeshConfig:
        """Makes an already validated overlay the running one (through the store, if any)."""
        if self.config_store is None:
            self._previous_overlay = self._overlay_docs
            self._overlay_docs = overlay
            self.state.apply_whole(config)
            return config
        stored = await self.config_store.apply(
            dump_yaml(overlay), expected_version=self._store_seen, applied_by=applied_by
        )
        self._store_seen = max(self._store_seen, stored.version)
        # Installed now rather than when the watch sees it: the caller reads its own write.
        if stored.version != self.store_version:
            self._overlay, self._overlay_docs = stored, overlay
            self.state.apply_whole(self._build(self._base, overlay, stored))
        return self.state.config

    async def rollback_config(
        self, *, expected_version: int, dry_run: bool
    ) -> tuple[MeshConfig, str, list[Document]]:
        """Admin.RollbackConfig: the overlay before the running one, validated like an apply.

        With a store, the version below the running one is written again as a new version
        (history only grows, and every gateway follows); rolling back twice returns to
        where it started, as ``kubectl rollout undo`` does. When the store's latest version
        was refused here, the running (last good) version is the one written again.
        Without a store, this gateway's overlay before its last admin change. Returns
        (config, what was restored, overlay).
        """
        source = "rollback"
        self._expect(expected_version)
        stored: ConfigVersion | None = None
        if self.config_store is not None:
            running = self.store_version
            # The store's latest was refused here (another writer's bad version): the last
            # good one is what runs, so that is what goes back on top of the store.
            target = running if self._store_seen > running else running - 1
            if running == 0:
                raise FailedPrecondition(
                    "nothing to roll back: the running config includes no config store version"
                )
            if target > 0:
                stored = await self.config_store.get(target)
                restored = f"store {stored.name!r} v{stored.version}"
                text = stored.yaml
            else:
                restored, text = "the config directory alone (before store version 1)", ""
        else:
            if self._previous_overlay is None:
                raise FailedPrecondition(
                    "nothing to roll back: no config was applied to this gateway since it "
                    "started (and it has no config store)"
                )
            restored = f"the config before version {self.state.config.version}"
            text = dump_yaml(self._previous_overlay)
        try:
            overlay = parse_yaml(text, restored)
            config = self._build(self._base, overlay, stored)
        except ConfigError as exc:
            if not dry_run:
                self.state.reject(source, exc.message)
            raise
        if dry_run:
            return config, restored, overlay
        applied_by = f"gateway admin rollback to {restored}"
        return (
            await self._install_overlay(overlay, config, applied_by=applied_by),
            restored,
            overlay,
        )

    def services(self) -> list[Service]:
        def register_admin(server: grpc.aio.Server) -> None:
            admin_pb2_grpc.add_AdminServicer_to_server(self.admin, server)

        # The relay forwards the mesh services; they are listed here so that health and
        # reflection name them (the gateway answers reflection itself).
        services = [Service(name, lambda server: None) for name in MESH_SERVICES]
        services.append(Service(ADMIN_SERVICE, register_admin))
        return services

    async def start(self, settings: ServerSettings) -> Serving:
        self.load_config()
        if self.config_store is not None:
            await self._load_store()
        serving = await self._start_relayed(settings)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_discovery()))
        if self.config_dir is not None:
            self._tasks.append(loop.create_task(self._watch_config()))
        if self.config_store is not None:
            self._tasks.append(loop.create_task(self._watch_store()))
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
        (Admin, health, reflection: see mesh/proxy/exchange.py)."""
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
            guard=self.guard.check if self._guard_in_relay else None,
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
        """Folds discovery updates into endpoint snapshots, forever.

        A source that fails is restarted after a pause; meanwhile the gateway keeps
        routing on its last snapshot (last known good), and the admin API's staleness
        grows so operators can see it.
        """
        while True:
            try:
                async for update in self.discovery.updates():
                    snapshot = self.table.apply(update)
                    if self.metrics is not None:
                        for host in changed_hosts(self.state.snapshot, snapshot):
                            self.metrics.ring_changed(host)
                    self.state.set_endpoints(snapshot)
                    self._discovered = True
                    addresses = {e.address for h in snapshot.hosts() for e in snapshot.endpoints(h)}
                    if self.relay is not None:
                        self.relay.pool.retain(addresses)
                    self._last_update = time.monotonic()
                    self.endpoints_changed.set()
                    self.endpoints_changed = asyncio.Event()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("discovery source failed; routing on the last snapshot, retrying")
            await asyncio.sleep(self.discovery_retry)

    async def _watch_config(self) -> None:
        assert self.config_dir is not None
        directory = self.config_dir
        while True:
            await asyncio.sleep(self.reload_interval)
            current = await asyncio.to_thread(fingerprint, directory)
            if current == self._fingerprint:
                continue
            self._fingerprint = current
            # Parse off the loop (file I/O); install on it, where routing reads the state.
            try:
                base = await asyncio.to_thread(load_path, directory)
                config = self._build(base, self._overlay_docs, self._overlay)
            except ConfigError as exc:
                self.state.reject(str(directory), exc.message)
                log.error(
                    "config rejected, still routing on version %d: %s",
                    self.state.config.version,
                    exc.message,
                )
                continue
            self._base = base
            self.state.apply_whole(config)
            log.info("config version %d loaded from %s", config.version, directory)

    async def _watch_store(self) -> None:
        """Follows the config store: each new version is laid over the directory base."""
        assert self.config_store is not None
        async for stored in self.config_store.watch(
            after=self._store_seen, interval=self.reload_interval
        ):
            if stored.version > self._store_seen:
                self._store_seen = stored.version
                self._take_store_version(stored)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
