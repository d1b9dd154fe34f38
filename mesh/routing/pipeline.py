"""One config pipeline for the gateway and every sidecar's outbound.

Sources (the config directory, the registry's config store, admin apply and rollback) feed
one pure merge (:func:`merge`: the directory's resources as the base, the store's latest
version or the admin's changes laid over them as ``kubectl apply`` would, then admission
against what the mesh knows) that yields one validated, frozen snapshot; the snapshot is
installed into a :class:`GatewayState` or refused, the rejection recorded and the running
config kept (last known good). Each source's text is parsed once per change.

The store is described by the :class:`VersionStore` protocol (the registry's
``ConfigStore`` implements it), so the core does not import the registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

from mesh.balance.endpoints import EndpointsSnapshot
from mesh.config.fields import ConfigError
from mesh.config.loader import Document, dump_yaml, fingerprint, load_path, parse_yaml
from mesh.config.snapshot import EMPTY, MeshConfig
from mesh.errors import Aborted, FailedPrecondition
from mesh.routing.admission import check_admission
from mesh.routing.state import GatewayState

log = logging.getLogger(__name__)


class StoredVersion(Protocol):
    """One version of the config store (``registry.config_store.ConfigVersion``)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def yaml(self) -> str: ...


class VersionStore(Protocol):
    """What the pipeline needs of the config store (``registry.config_store.ConfigStore``)."""

    async def current(self) -> StoredVersion | None: ...
    async def get(self, version: int) -> StoredVersion: ...
    async def apply(
        self, yaml_text: str, *, expected_version: int, applied_by: str
    ) -> StoredVersion: ...
    def watch(self, *, after: int, interval: float) -> AsyncIterator[StoredVersion]: ...


def validate_documents(text: str) -> None:
    """The config store's validator: every resource parses (cross-references are checked
    by the writer against its directory base before it writes)."""
    parse_yaml(text, "config store")


def same_resource(a: Document, b: Document) -> bool:
    ra, rb = a.resource.metadata, b.resource.metadata
    return (a.kind, ra.namespace, ra.name) == (b.kind, rb.namespace, rb.name)


def overlaid(overlay: Sequence[Document], incoming: Sequence[Document]) -> list[Document]:
    """``kubectl apply``: each incoming resource replaces the overlay's of the same kind,
    namespace and name; the others join."""
    kept = [d for d in overlay if not any(same_resource(d, n) for n in incoming)]
    return [*kept, *incoming]


def describe(config_dir: Path | None, stored: StoredVersion | None, admin: bool) -> str:
    """Where a config came from, for ``source`` (Admin's GetConfig shows it)."""
    parts = [str(config_dir)] if config_dir is not None else []
    if stored is not None:
        parts.append(f"store {stored.name!r} v{stored.version}")
    elif admin:
        parts.append("admin")  # applied in memory (no store)
    return " + ".join(parts) or "<none>"


def merge(
    base: Sequence[Document],
    overlay: Sequence[Document],
    *,
    source: str,
    running: MeshConfig,
    endpoints: EndpointsSnapshot | None,
) -> MeshConfig:
    """The pure merge: base then overlay, validated as a whole and against what the mesh
    knows (``mesh.routing.admission``: ``endpoints`` None means discovery has not reported
    yet, so registrations are unknown). The result is the running version plus one.
    Raises ``ConfigError``."""
    config = EMPTY.merged(base, version=0, source="").merged(
        overlay, version=running.version + 1, source=source
    )
    check_admission(config, running, endpoints)
    return config


class ConfigPipeline:
    """Feeds a :class:`GatewayState` from the directory, the store and admin changes.

    Every way a config arrives comes through :meth:`build`, so no source can install a
    config that strands a served host. With a store, admin changes are written through
    it (optimistic concurrency on the store version) and every reader of that store —
    gateways and sidecar outbounds — converges on the same config.
    """

    def __init__(
        self,
        state: GatewayState,
        *,
        config_dir: Path | None = None,
        store: VersionStore | None = None,
        reload_interval: float = 1.0,
    ) -> None:
        self.state = state
        self.config_dir = config_dir
        self.store = store
        self.reload_interval = reload_interval
        #: The directory's resources, and the store version laid over them (None: none).
        self.base: list[Document] = []
        self.overlay: StoredVersion | None = None
        self.overlay_docs: list[Document] = []
        #: The newest store version read, installed or rejected (what a write builds on).
        self.store_seen = 0
        #: Without a store: the overlay before the last admin change (what rollback restores).
        self.previous_overlay: list[Document] | None = None
        #: Whether discovery has reported once: until then registrations are unknown.
        self.discovered = False
        self._fingerprint: tuple[tuple[str, int, int], ...] = ()

    @property
    def store_version(self) -> int:
        """The config store version the running config includes (0: none)."""
        return self.overlay.version if self.overlay is not None else 0

    def build(
        self, base: Sequence[Document], overlay: Sequence[Document], stored: StoredVersion | None
    ) -> MeshConfig:
        """:func:`merge` against the running state; raises ``ConfigError``."""
        return merge(
            base,
            overlay,
            source=describe(self.config_dir, stored, bool(overlay)),
            running=self.state.config,
            endpoints=self.state.snapshot if self.discovered else None,
        )

    def _refuse(self, source: str, message: str) -> None:
        self.state.reject(source, message)
        log.error(
            "config rejected, still routing on version %d: %s", self.state.config.version, message
        )

    # -- start-up ---------------------------------------------------------------------------

    def load_directory(self) -> None:
        """Loads the config directory; at start-up a bad one is fatal (nothing to fall back to)."""
        if self.config_dir is None:
            return
        self._fingerprint = fingerprint(self.config_dir)
        self.base = load_path(self.config_dir)
        self.state.apply_whole(self.build(self.base, self.overlay_docs, self.overlay))

    async def load_store(self) -> None:
        """At start-up: lays the store's latest version over the directory.

        A stored version that does not validate here (say, it names a subset only another
        gateway's directory defines) is a rejection, not a crash: the base keeps routing.
        """
        if self.store is None:
            return
        current = await self.store.current()
        if current is not None:
            self.store_seen = current.version
            self.take_store_version(current)

    async def start(self) -> None:
        self.load_directory()
        await self.load_store()

    # -- sources ----------------------------------------------------------------------------

    def take_store_version(self, stored: StoredVersion) -> bool:
        """Lays a store version over the base: installed, or refused (last known good)."""
        source = f"store {stored.name!r} v{stored.version}"
        try:
            docs = parse_yaml(stored.yaml, source)
            config = self.build(self.base, docs, stored)
        except ConfigError as exc:
            self._refuse(source, exc.message)
            return False
        self.overlay, self.overlay_docs = stored, docs
        self.state.apply_whole(config)
        log.info("config version %d: %s", config.version, config.source)
        return True

    async def watch_directory(self) -> None:
        """Follows the config directory: a change rebuilds over the same overlay."""
        if self.config_dir is None:
            return
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
                config = self.build(base, self.overlay_docs, self.overlay)
            except ConfigError as exc:
                self._refuse(str(directory), exc.message)
                continue
            self.base = base
            self.state.apply_whole(config)
            log.info("config version %d loaded from %s", config.version, directory)

    async def watch_store(self) -> None:
        """Follows the config store: each new version is laid over the directory base."""
        if self.store is None:
            return
        async for stored in self.store.watch(after=self.store_seen, interval=self.reload_interval):
            if stored.version > self.store_seen:
                self.store_seen = stored.version
                self.take_store_version(stored)

    def watchers(self) -> list[asyncio.Task[None]]:
        """Tasks following the sources this pipeline has (cancel them to stop)."""
        loop = asyncio.get_running_loop()
        tasks = []
        if self.config_dir is not None:
            tasks.append(loop.create_task(self.watch_directory()))
        if self.store is not None:
            tasks.append(loop.create_task(self.watch_store()))
        return tasks

    # -- admin ------------------------------------------------------------------------------

    def _expect(self, expected_version: int) -> None:
        if expected_version and expected_version != self.state.config.version:
            raise Aborted(
                f"config version is {self.state.config.version}, "
                f"not the expected {expected_version}"
            )

    async def apply(self, text: str, *, expected_version: int, dry_run: bool) -> MeshConfig:
        """Admin.ApplyConfig: validate here, then write through the store (if any).

        ``expected_version`` is the running config version the caller read (0: any); the
        store write itself expects the store version the running config includes, so of
        two writers applying at once, one wins and the other gets ``Aborted``. Without a
        store the change lives in this process's memory (lost on restart).
        """
        source = "admin"
        self._expect(expected_version)
        try:
            incoming = parse_yaml(text, source)
            if not incoming:
                # Else a new version identical to the running one: the rollback after it
                # would restore nothing (kubectl: "no objects passed to apply").
                raise ConfigError(f"{source}: no resources to apply")
            overlay = overlaid(self.overlay_docs, incoming)
            config = self.build(self.base, overlay, self.overlay)
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
        if self.store is None:
            self.previous_overlay = self.overlay_docs
            self.overlay_docs = overlay
            self.state.apply_whole(config)
            return config
        stored = await self.store.apply(
            dump_yaml(overlay), expected_version=self.store_seen, applied_by=applied_by
        )
        self.store_seen = max(self.store_seen, stored.version)
        # Installed now rather than when the watch sees it: the caller reads its own write.
        if stored.version != self.store_version:
            self.overlay, self.overlay_docs = stored, overlay
            self.state.apply_whole(self.build(self.base, overlay, stored))
        return self.state.config

    async def rollback(
        self, *, expected_version: int, dry_run: bool
    ) -> tuple[MeshConfig, str, list[Document]]:
        """Admin.RollbackConfig: the overlay before the running one, validated like an apply.

        With a store, the version below the running one is written again as a new version
        (history only grows, and every reader follows); rolling back twice returns to
        where it started, as ``kubectl rollout undo`` does. When the store's latest version
        was refused here, the running (last good) version is the one written again.
        Without a store, the overlay before the last admin change. Returns (config, what
        was restored, overlay).
        """
        source = "rollback"
        self._expect(expected_version)
        stored: StoredVersion | None = None
        if self.store is not None:
            running = self.store_version
            # The store's latest was refused here (another writer's bad version): the last
            # good one is what runs, so that is what goes back on top of the store.
            target = running if self.store_seen > running else running - 1
            if running == 0:
                raise FailedPrecondition(
                    "nothing to roll back: the running config includes no config store version"
                )
            if target > 0:
                stored = await self.store.get(target)
                restored = f"store {stored.name!r} v{stored.version}"
                text = stored.yaml
            else:
                restored, text = "the config directory alone (before store version 1)", ""
        else:
            if self.previous_overlay is None:
                raise FailedPrecondition(
                    "nothing to roll back: no config was applied to this gateway since it "
                    "started (and it has no config store)"
                )
            restored = f"the config before version {self.state.config.version}"
            text = dump_yaml(self.previous_overlay)
        try:
            overlay = parse_yaml(text, restored)
            config = self.build(self.base, overlay, stored)
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
