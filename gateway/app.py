"""Assembles a running gateway: proxy, admin, discovery loop and config hot reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc.aio

from gateway.admin import Admin
from gateway.channels import ChannelPool
from gateway.discovery import DiscoverySource, EndpointTable
from gateway.methods import MESH_SERVICES
from gateway.proxy import Proxy
from gateway.state import GatewayState
from mesh.balance.endpoints import EndpointsSnapshot
from mesh.config.fields import ConfigError
from mesh.config.loader import yaml_files
from mesh.config.snapshot import config_from_path
from mesh.server.app import ServerSettings, Service, Serving, start_server
from mesh.telemetry.metrics import MeshMetrics
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when any config file does (name, mtime, size), cheap to poll."""
    found = []
    for path in yaml_files(directory):
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((path.name, stat.st_mtime_ns, stat.st_size))
    return tuple(found)


def changed_hosts(old: EndpointsSnapshot, new: EndpointsSnapshot) -> list[str]:
    """Hosts whose membership (addresses, health, weights) differs: their rings are rebuilt."""
    return [
        host
        for host in sorted(set(old.hosts()) | set(new.hosts()))
        if old.endpoints(host) != new.endpoints(host)
    ]


class Gateway:
    """The ingress: routes every mesh method to workers; configured by YAML and the admin API."""

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
    ) -> None:
        self.state = state or GatewayState()
        self.discovery = discovery
        self.config_dir = config_dir
        self.reload_interval = reload_interval
        #: Edge concerns in front of the proxy (client auth and rate limits: gateway.auth).
        self.interceptors = tuple(interceptors)
        self.discovery_retry = discovery_retry
        self.table = EndpointTable()
        # With credentials, upstream calls are mutual TLS (to sidecars).
        self.channels = ChannelPool(credentials=channel_credentials)
        self.metrics = metrics
        self.proxy = Proxy(self.state, self.channels, metrics=metrics)
        self._last_update = time.monotonic()
        self.admin = Admin(
            self.state, self.table, staleness=lambda: time.monotonic() - self._last_update
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
        self._fingerprint = _fingerprint(directory)
        self.state.apply_whole(config_from_path(directory, version=self.state.config.version + 1))

    def services(self) -> list[Service]:
        def register_proxy(server: grpc.aio.Server) -> None:
            server.add_generic_rpc_handlers([self.proxy])

        def register_admin(server: grpc.aio.Server) -> None:
            admin_pb2_grpc.add_AdminServicer_to_server(self.admin, server)

        # The proxy is one generic handler; the other mesh services are listed so that
        # health and reflection name them (the gateway answers reflection itself).
        services = [Service(MESH_SERVICES[0], register_proxy)]
        services += [Service(name, lambda server: None) for name in MESH_SERVICES[1:]]
        services.append(Service(ADMIN_SERVICE, register_admin))
        return services

    async def start(self, settings: ServerSettings) -> Serving:
        self.load_config()
        serving = await start_server(settings, self.services(), interceptors=self.interceptors)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_discovery()))
        if self.config_dir is not None:
            self._tasks.append(loop.create_task(self._watch_config()))
        serving.on_drain(self.close)
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
                    self.channels.retain(
                        {e.address for h in snapshot.hosts() for e in snapshot.endpoints(h)}
                    )
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
            fingerprint = await asyncio.to_thread(_fingerprint, directory)
            if fingerprint == self._fingerprint:
                continue
            self._fingerprint = fingerprint
            # Parse off the loop (file I/O); install on it, where routing reads the state.
            try:
                config = await asyncio.to_thread(
                    config_from_path, directory, version=self.state.config.version + 1
                )
            except ConfigError as exc:
                self.state.reject(str(directory), exc.message)
                log.error(
                    "config rejected, still routing on version %d: %s",
                    self.state.config.version,
                    exc.message,
                )
                continue
            self.state.apply_whole(config)
            log.info("config version %d loaded from %s", config.version, directory)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.proxy.close()
        await self.channels.close()
