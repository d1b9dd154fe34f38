"""The served view of the model repository: polls it, loads versions before retiring old ones.

Each model has the versions its policy allows on disk, plus *retiring* versions that
left the policy (a newer one appeared) but keep serving until the newest version is
loaded and warmed: load before unload, so a rollout never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from mesh.errors import FailedPrecondition, MeshError, NotFound, Unavailable
from protos.inference import model_config_pb2 as mc
from workers.inference.batcher import BatchPolicy, DynamicBatcher
from workers.inference.cache import ModelCache
from workers.inference.causes import load_failure
from workers.inference.fingerprint import Fingerprint, recheck, take
from workers.inference.model import LoadedModel, Signature, load_model
from workers.inference.stats import Statistics
from workers.inference.versions import allowed_versions, choose_version
from workers.model_repo import ModelRepo, RepositoryError

log = logging.getLogger(__name__)

Key = tuple[str, int]
#: Logged when a request has to wait for its version to load.
COLD_LOAD = "cold load on the request path:"


@dataclass
class Served:
    """A loaded version and the batcher that feeds it."""

    model: LoadedModel
    batcher: DynamicBatcher
    #: The model file as it was just before it loaded (None: unreadable then).
    fingerprint: Fingerprint | None = None


@dataclass
class ModelState:
    """What the worker knows of one model in the repository."""

    name: str
    config: mc.ModelConfig | None = None
    signature: Signature | None = None
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    allowed: list[int] = field(default_factory=list)
    retiring: set[int] = field(default_factory=set)
    ready: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    #: Why the model cannot serve at all (bad config), if so.
    error: str = ""
    #: Unloaded through RepositoryModelUnload: polling leaves it alone until a Load.
    unloaded: bool = False
    #: A changed config whose versions failed to load; not retried until it changes again.
    rejected: mc.ModelConfig | None = None
    #: The config RepositoryModelLoad was given (Triton's ``config`` parameter): it
    #: stands in for config.pbtxt until a load without one.
    override: mc.ModelConfig | None = None
    #: Versions whose model file was replaced with content that failed to load: the
    #: digest not retried until the file changes again, and why it failed.
    rejected_files: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def servable(self) -> set[int]:
        return set(self.allowed) | self.retiring


class ModelRepository:
    """Serves the models of one repository URL on one device."""

    def __init__(
        self,
        repo: ModelRepo,
        stats: Statistics,
        *,
        device: torch.device | None = None,
        memory_budget_bytes: int = 0,
        executor: Executor | None = None,
        batching: bool = True,
        loader: Callable[[ModelRepo, mc.ModelConfig, int, torch.device], LoadedModel] = load_model,
    ) -> None:
        self.repo = repo
        self.stats = stats
        self.device = device or torch.device("cpu")
        self.batching = batching
        self._executor = executor
        self._loader = loader
        self._models: dict[str, ModelState] = {}
        self._lock = asyncio.Lock()
        self.cache: ModelCache[Key, Served] = ModelCache(
            self._load, lambda s: s.model.memory_bytes, memory_budget_bytes, self._evicted
        )
        self._poller: asyncio.Task[None] | None = None
        self._poll_interval_s: float | None = None
        #: Requests that found their version not loaded and waited for it.
        self.cold_loads = 0
        #: A start that scanned without loading: :meth:`preload` says what to load first.
        self.awaiting_preload = False
        self._defer_loads = False
        #: The repository's root was missing at the last poll (warned once per outage).
        self._repo_missing = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, poll_interval_s: float | None, *, load: bool = True) -> None:
        """Loads what the repository holds now; then polls every ``poll_interval_s`` (None: never).

        ``load=False`` reads the models and their versions without loading any, and waits
        for :meth:`preload` (the sidecar's list of the versions the ring gives this
        worker) to load them and start polling.
        """
        self._poll_interval_s = poll_interval_s
        self._defer_loads = not load
        await self.poll_once()
        # Only now: the servable versions a waiting worker lists are the scan's, complete.
        self.awaiting_preload = not load
        if load and poll_interval_s:
            self._poller = asyncio.create_task(self._poll_forever(poll_interval_s))

    def servable_versions(self) -> dict[str, list[int]]:
        """Each usable model's servable versions (what a preload chooses among)."""
        return {
            name: sorted(state.servable)
            for name, state in sorted(self._models.items())
            if not state.unloaded and state.config is not None and state.servable
        }

    async def preload(self, owned: Collection[Key] | None) -> None:
        """Ends a ``load=False`` start: loads ``owned`` first, then the rest while it fits.

        ``owned`` (the versions the ring routes here; None: no ring information) load
        newest first; the other servable versions follow only while the memory budget
        has room, judged by the size of a version already loaded, so none of them evicts
        an owned one. Without a budget everything loads, as a plain start does.
        """
        async with self._lock:
            if not self.awaiting_preload:
                raise FailedPrecondition("the worker is not waiting for a preload")
            self.awaiting_preload = self._defer_loads = False
            keys = [
                (name, version)
                for name, versions in self.servable_versions().items()
                for version in sorted(versions, reverse=True)
            ]
            first = [k for k in keys if owned is None or k in owned]
            rest = [k for k in keys if k not in first]
            for key in first:
                # A failure is recorded in state.failed by _load; the others still load.
                with contextlib.suppress(Exception):
                    await self.cache.get(key)
            for key in rest:
                if not self._fits(key):
                    log.info("model %s version %s: not preloaded, the budget is full", *key)
                    continue
                with contextlib.suppress(Exception):
                    await self.cache.get(key)
            log.info(
                "preloaded %s (ring-owned: %s)",
                ", ".join(f"{n}:{v}" for n, v in self.cache.loaded_keys()) or "nothing",
                "unknown, all" if owned is None else ", ".join(f"{n}:{v}" for n, v in first),
            )
        if self._poll_interval_s:
            self._poller = asyncio.create_task(self._poll_forever(self._poll_interval_s))

    def _fits(self, key: Key) -> bool:
        """Whether ``key`` likely fits beside what is loaded: the size of a loaded version
        of the same model (else of any) stands in for its own, unknown before loading."""
        budget = self.cache.budget_bytes
        if not budget:
            return True
        loaded = self.cache.values()
        if not loaded:
            return True
        same = [s.model.memory_bytes for s in loaded if s.model.name == key[0]]
        estimate = max(same or [s.model.memory_bytes for s in loaded])
        return self.cache.used_bytes + estimate <= budget

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def _poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except Exception:  # a storage hiccup must not stop the watcher
                log.exception("polling the model repository failed; keeping the last state")

    # -- polling -----------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Brings the served state in line with the repository (one scan)."""
        async with self._lock:
            names = await asyncio.to_thread(self.repo.list_models)
            if not names and self._models and not await asyncio.to_thread(self.repo.present):
                # The whole repository gone (a deleted or unmounted folder, an object store
                # prefix unreachable) is a storage fault, not every model's removal: the
                # loaded weights keep serving (last known good) until it is back. Removing
                # the models themselves still unloads them, as Triton's poll mode does.
                if not self._repo_missing:
                    log.warning(
                        "model repository %s is missing; serving the models already loaded",
                        self.repo.url,
                    )
                self._repo_missing = True
                return
            if self._repo_missing:
                log.info("model repository %s is back", self.repo.url)
                self._repo_missing = False
            for gone in set(self._models) - set(names):
                log.info("model %s left the repository; unloading it", gone)
                self._drop(self._models.pop(gone))
            for name in names:
                state = self._models.setdefault(name, ModelState(name))
                if not state.unloaded:
                    await self._sync(state)
                    await self._reload_changed_files(state)

    async def _sync(self, state: ModelState, *, reload: bool = False) -> None:
        try:
            if state.override is not None:
                config = mc.ModelConfig()
                config.CopyFrom(state.override)
            else:
                config = await asyncio.to_thread(self.repo.read_config, state.name)
            config.name = state.name
            signature = Signature.from_config(config)
            policy = BatchPolicy.from_config(config)
            on_disk = await asyncio.to_thread(self.repo.list_versions, state.name)
        except (RepositoryError, MeshError, OSError) as exc:
            # Last known good: a broken config keeps the versions already serving.
            state.error = load_failure(exc)
            log.warning("model %s: %s", state.name, state.error)
            return
        if reload and state.ready and state.config is not None:
            # Triton's reload: the loaded versions serve until the reloaded ones are
            # warm, and stay if the reload fails.
            await self._swap_config(state, config, signature, policy, on_disk)
            return
        if reload:
            self._drop(state)
        elif state.config is not None and state.config != config:
            if config != state.rejected:
                await self._swap_config(state, config, signature, policy, on_disk)
            return
        state.config, state.signature, state.error = config, signature, ""
        state.policy = policy if self.batching else policy.without_batching()
        allowed = allowed_versions(config.version_policy, on_disk)
        state.retiring |= set(state.allowed) - set(allowed)
        state.retiring -= set(allowed)
        state.allowed = allowed
        # Newest first: it becomes the default as soon as it is ready. While a preload is
        # awaited nothing loads: the preload picks the order.
        for version in sorted(allowed, reverse=True) if not self._defer_loads else ():
            if version not in state.ready and version not in state.failed:
                # A failure is recorded in state.failed by _load; the others still load.
                with contextlib.suppress(Exception):
                    await self.cache.get((state.name, version))
        newest = max(allowed, default=None)
        if newest is None or newest in state.ready:
            for version in sorted(state.retiring):
                self.cache.evict((state.name, version))
                state.ready.discard(version)
                state.failed.pop(version, None)
            state.retiring.clear()

    async def _swap_config(
        self,
        state: ModelState,
        config: mc.ModelConfig,
        signature: Signature,
        policy: BatchPolicy,
        on_disk: list[int],
    ) -> None:
        """A changed config: load its versions aside, then swap them in (load before unload).

        If the newest version does not load under the new config, the old config and
        its versions keep serving and the new config is remembered as rejected.
        """
        log.info("model %s: config changed; loading its versions under the new config", state.name)
        allowed = allowed_versions(config.version_policy, on_disk)
        batch_policy = policy if self.batching else policy.without_batching()
        loaded: dict[int, Served] = {}
        failed: dict[int, str] = {}
        for version in sorted(allowed, reverse=True):
            try:
                loaded[version] = await self._build(config, version, batch_policy)
            except Exception as exc:
                failed[version] = load_failure(exc)
                log.warning("model %s version %s failed to load", state.name, version, exc_info=exc)
        newest = max(allowed, default=None)
        if newest is not None and newest not in loaded:
            state.rejected = config
            state.error = f"config change rejected: version {newest}: {failed[newest]}"
            log.warning("model %s: %s; the previous config keeps serving", state.name, state.error)
            return
        for version in state.servable | state.ready:
            if version not in loaded:
                self.cache.evict((state.name, version))
        for version, served in loaded.items():
            self.cache.put((state.name, version), served)
            self._loaded(state.name, served.model)
        state.rejected_files.clear()
        state.config, state.signature, state.policy, state.error = (
            config,
            signature,
            batch_policy,
            "",
        )
        state.allowed, state.retiring, state.rejected = allowed, set(), None
        state.ready, state.failed = set(loaded), failed

    async def _reload_changed_files(self, state: ModelState) -> None:
        """Reloads each loaded version whose model file changed (load before unload).

        The old load serves until the new one is warm; if the new content fails to
        load, the old one keeps serving and the index says why, until the file
        changes again.
        """
        if state.config is None:
            return
        config = state.config
        for version in sorted(state.ready):
            key = (state.name, version)
            served = self.cache.peek(key)
            if served is None or served.fingerprint is None:
                continue  # not in memory: its next load reads the file as it is then
            now = await asyncio.to_thread(recheck, self.repo, config, version, served.fingerprint)
            if now is None or now.digest == served.fingerprint.digest:
                if now is not None:
                    served.fingerprint = now  # same bytes, new stamp: do not hash again
                continue
            rejected = state.rejected_files.get(version)
            if rejected is not None and rejected[0] == now.digest:
                continue
            log.info("model %s version %s: model file changed; reloading it", state.name, version)
            try:
                fresh = await self._build(config, version, state.policy)
            except Exception as exc:
                reason = f"changed model file not loaded, previous one serving: {load_failure(exc)}"
                state.rejected_files[version] = (now.digest, reason)
                log.warning("model %s version %s: %s", state.name, version, reason, exc_info=exc)
                continue
            if self.cache.peek(key) is not served or state.config is not config:
                continue  # unloaded, evicted or reconfigured meanwhile: that wins
            self.cache.put(key, fresh)
            self._loaded(state.name, fresh.model)
            state.rejected_files.pop(version, None)

    def _drop(self, state: ModelState) -> None:
        for version in state.servable | state.ready | set(state.failed):
            self.cache.evict((state.name, version))
        state.allowed, state.retiring, state.ready, state.failed = [], set(), set(), {}
        state.rejected_files.clear()

    # -- loading -----------------------------------------------------------------------------

    async def _load(self, key: Key) -> Served:
        name, version = key
        state = self._models.get(name)
        if state is None or state.config is None:
            raise Unavailable(f"model {name!r} is not available")
        try:
            served = await self._build(state.config, version, state.policy)
        except Exception as exc:
            state.failed[version] = load_failure(exc)
            state.ready.discard(version)
            log.warning("model %s version %s failed to load", name, version, exc_info=exc)
            raise Unavailable(
                f"model {name!r} version {version} failed to load: {state.failed[version]}"
            ) from None
        state.failed.pop(version, None)
        state.rejected_files.pop(version, None)
        state.ready.add(version)
        self._loaded(name, served.model)
        return served

    async def _build(self, config: mc.ModelConfig, version: int, policy: BatchPolicy) -> Served:
        """Loads and warms one version off the event loop, with its batcher."""
        # Taken before the load reads the file: a replacement during the load then
        # shows as a change on the next poll rather than going unnoticed.
        fingerprint = await asyncio.to_thread(take, self.repo, config, version)
        model = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._loader, self.repo, config, version, self.device
        )
        if model.concurrency is not None:
            # The GPU path keeps a batch staging per instance while another computes.
            policy = dataclasses.replace(policy, instances=model.concurrency)
        return Served(model, DynamicBatcher(model, policy, self.stats, self._executor), fingerprint)

    def _loaded(self, name: str, model: LoadedModel) -> None:
        kind = "GPU" if self.device.type == "cuda" else "CPU"
        index = self.device.index or 0
        self.stats.record_memory(name, model.version, model.memory_bytes, kind, index)
        log.info("model %s version %s loaded and warmed", name, model.version)

    def _evicted(self, key: Key, served: Served) -> None:
        self.stats.record_memory(key[0], key[1], 0, "CPU", 0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- requests ----------------------------------------------------------------------------

    def state(self, name: str) -> ModelState:
        state = self._models.get(name)
        if state is None:
            raise NotFound(f"unknown model {name!r}")
        return state

    def _usable(self, name: str) -> ModelState:
        state = self.state(name)
        if state.unloaded:
            raise Unavailable(f"model {name!r} is unloaded")
        if state.config is None:
            raise Unavailable(f"model {name!r} is not available: {state.error or 'no config'}")
        return state

    def resolve(
        self, name: str, requested: str, header: str | None = None
    ) -> tuple[ModelState, int]:
        """The model and the version a request runs on (see :func:`choose_version`)."""
        state = self._usable(name)
        version = choose_version(name, requested, header, state.servable, state.ready)
        return state, version

    async def acquire(
        self, name: str, requested: str, header: str | None = None, timeout: float | None = None
    ) -> Served:
        """The loaded version a request runs on, loading it on demand (waits up to ``timeout``)."""
        state, version = self.resolve(name, requested, header)
        if version in state.failed:
            raise Unavailable(
                f"model {name!r} version {version} failed to load: {state.failed[version]}"
            )
        if not self.cache.is_loaded((name, version)):
            # The request waits for the weights: what routing and the preload before
            # readiness are there to avoid (bench/autoscale.py counts these lines).
            self.cold_loads += 1
            log.warning("%s model %s version %s", COLD_LOAD, name, version)
        return await self.cache.get((name, version), timeout)

    def is_ready(self, name: str, requested: str) -> bool:
        state = self._models.get(name)
        if state is None or state.unloaded or state.config is None:
            return False
        try:
            _, version = self.resolve(name, requested)
        except MeshError:
            return False
        return version in state.ready

    def names(self) -> list[str]:
        return sorted(self._models)

    def ready_versions(self, name: str) -> list[int]:
        state = self._models.get(name)
        if state is None or state.unloaded:
            return []
        return sorted(v for v in state.ready if v in state.servable)

    # -- explicit control --------------------------------------------------------------------

    async def load(self, name: str, config: mc.ModelConfig | None = None) -> None:
        """(Re)loads ``name``: re-reads its versions, and its config unless ``config`` is given.

        ``config`` (Triton's load-time override) serves instead of config.pbtxt until
        a load without one. A loaded model serves until its reload is warm and keeps
        serving if the reload fails (the error says why).
        """
        async with self._lock:
            exists = await asyncio.to_thread(self.repo.list_models)
            if name not in exists:
                raise NotFound(f"model {name!r} is not in the repository")
            if config is not None:
                # A config that cannot describe a model is the caller's error, not a load's.
                Signature.from_config(config)
            state = self._models.setdefault(name, ModelState(name))
            previous = state.override
            state.unloaded = False
            state.override = config
            # An explicit load retries what polling would not (a rejected config or file).
            state.rejected = None
            await self._sync(state, reload=True)
            if state.error:
                if state.ready:
                    # The loaded versions keep serving under the config they loaded with;
                    # polling must not retry the refused one behind the caller's back.
                    state.override, state.rejected = previous, None
                raise Unavailable(f"model {name!r} cannot load: {state.error}")
            failed = [f"version {v}: {r}" for v, r in sorted(state.failed.items())]
            if failed and not state.ready:
                raise Unavailable(f"model {name!r} failed to load ({'; '.join(failed)})")

    async def unload(self, name: str) -> None:
        async with self._lock:
            state = self.state(name)
            self._drop(state)
            state.unloaded = True

    def index(self, ready_only: bool) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) rows for RepositoryIndex."""
        rows: list[tuple[str, str, str, str]] = []
        for name in self.names():
            state = self._models[name]
            if state.unloaded or (state.config is None and state.error):
                if not ready_only:
                    rows.append(
                        (name, "", "UNAVAILABLE", "unloaded" if state.unloaded else state.error)
                    )
                continue
            for version in sorted(state.servable | set(state.failed)):
                key = (name, version)
                if version in state.failed:
                    row = (name, str(version), "UNAVAILABLE", state.failed[version])
                elif self.cache.is_loading(key):
                    row = (name, str(version), "LOADING", "")
                elif version in state.ready:
                    # A loaded version may still carry a note: a rejected config or file.
                    notes = [state.error, state.rejected_files.get(version, ("", ""))[1]]
                    reason = (
                        "; ".join(n for n in notes if n)
                        if self.cache.is_loaded(key)
                        else "evicted from the cache; reloads on demand"
                    )
                    row = (name, str(version), "READY", reason)
                else:
                    row = (name, str(version), "UNAVAILABLE", "not loaded yet")
                if not ready_only or row[2] == "READY":
                    rows.append(row)
        return rows

    @property
    def queue_depth(self) -> int:
        return sum(served.batcher.queue_depth for served in self.cache.values())
