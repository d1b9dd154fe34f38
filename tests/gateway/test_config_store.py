"""The gateway's routing config from the registry's config store, over the directory base."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from mesh.config.fields import ConfigError
from mesh.errors import Aborted, FailedPrecondition
from mesh.routing.discovery import StaticDiscovery
from mesh.routing.pipeline import validate_documents
from mesh.server.app import ServerSettings
from registry.config_store import ConfigStore
from registry.connect import StoreSettings
from registry.embedded import EmbeddedStore
from registry.store import Store, open_store
from tests.support.istio_yaml import BAD_SUBSET

REPO = Path(__file__).resolve().parents[2]

CANARY = (REPO / "config" / "examples" / "canary-90-10.yaml").read_text()


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedStore(tmp_path_factory.mktemp("es-store"), advertise=False) as store:
        yield store.url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with open_store(StoreSettings(url=store_url, prefix=f"t{uuid.uuid4().hex[:12]}")) as s:
        yield s


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(REPO / "config", target, ignore=shutil.ignore_patterns("examples"))
    return target


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def routing(store: Store) -> ConfigStore:
    return store.config(validator=validate_documents)


@pytest.fixture
async def gateway(store: Store, config_dir: Path) -> AsyncIterator[Gateway]:
    gateway = Gateway(
        StaticDiscovery(), config_dir=config_dir, reload_interval=0.05, config_store=routing(store)
    )
    serving = await gateway.start(ServerSettings(port=0))
    try:
        yield gateway
    finally:
        await serving.drain(grace=0)


def canary_rule(gateway: Gateway) -> bool:
    vs = gateway.state.config.virtual_services_for("inference")[0]
    return vs is not None and any(rule.name == "canary" for rule in vs.http)


async def test_the_store_overlays_the_directory_at_start(store: Store, config_dir: Path) -> None:
    await routing(store).apply(CANARY)
    gateway = Gateway(StaticDiscovery(), config_dir=config_dir, config_store=routing(store))
    serving = await gateway.start(ServerSettings(port=0))
    try:
        config = gateway.state.config
        # The store's VirtualService replaced the directory's; the directory's rules stay.
        assert canary_rule(gateway)
        assert config.destination_rule("inference") is not None
        assert config.virtual_services_for("data")
        assert config.source == f"{config_dir} + store 'routing' v1"
    finally:
        await serving.drain(grace=0)


async def test_apply_writes_through_the_store_and_others_follow(
    gateway: Gateway, store: Store, config_dir: Path
) -> None:
    running = gateway.state.config.version
    config = await gateway.apply_config(CANARY, expected_version=running, dry_run=False)
    assert config.version == running + 1 and canary_rule(gateway)
    stored = await routing(store).current()
    assert stored is not None and stored.version == 1 and "canary" in stored.yaml

    # A second gateway on the same store starts with it.
    other = Gateway(StaticDiscovery(), config_dir=config_dir, config_store=routing(store))
    serving = await other.start(ServerSettings(port=0))
    try:
        assert canary_rule(other)
    finally:
        await serving.drain(grace=0)

    # Dry runs validate and write nothing.
    await gateway.apply_config(CANARY, expected_version=0, dry_run=True)
    assert (await routing(store).current()) == stored


async def test_a_concurrent_writer_wins_and_the_stale_gateway_is_aborted(
    store: Store, config_dir: Path
) -> None:
    # A gateway whose watch will not look again for a minute: its view stays at v1.
    slow = Gateway(
        StaticDiscovery(), config_dir=config_dir, reload_interval=60, config_store=routing(store)
    )
    serving = await slow.start(ServerSettings(port=0))
    try:
        await slow.apply_config(CANARY, expected_version=0, dry_run=False)
        # Another writer moves the store on to v2 meanwhile.
        await routing(store).apply(CANARY.replace('"2"', '"3"'), expected_version=1)
        with pytest.raises(Aborted, match="re-read it and apply again"):
            await slow.apply_config(CANARY.replace('"2"', '"4"'), expected_version=0, dry_run=False)
        stored = await routing(store).current()
        assert stored is not None and stored.version == 2 and '"3"' in stored.yaml
    finally:
        await serving.drain(grace=0)


async def test_rejected_versions_keep_the_running_config_and_the_next_apply_repairs(
    gateway: Gateway, store: Store, config_dir: Path
) -> None:
    await gateway.apply_config(CANARY, expected_version=0, dry_run=False)
    version = gateway.state.config.version

    # Refused before it reaches the store: validated against the directory base here.
    with pytest.raises(ConfigError, match="nowhere"):
        await gateway.apply_config(BAD_SUBSET, expected_version=0, dry_run=False)
    assert (await routing(store).current()).version == 1  # type: ignore[union-attr]

    # Written by someone else (it parses; the subset does not exist here): the watch rejects.
    await routing(store).apply(BAD_SUBSET, expected_version=1)

    async def rejected() -> bool:
        last = gateway.state.last_rejection
        return last is not None and last.source == "store 'routing' v2"

    assert await eventually(rejected)
    assert gateway.state.config.version == version and canary_rule(gateway)

    # A broken file: rejected too, the running config stays.
    (config_dir / "broken.yaml").write_text("kind: [\n")

    async def file_rejected() -> bool:
        last = gateway.state.last_rejection
        return last is not None and last.source == str(config_dir)

    assert await eventually(file_rejected)
    assert gateway.state.config.version == version
    (config_dir / "broken.yaml").unlink()

    # The next apply builds on the last good store version and supersedes the bad one.
    dr = (REPO / "config" / "inference.yaml").read_text()
    await gateway.apply_config(dr, expected_version=0, dry_run=False)
    latest = await routing(store).current()
    assert latest is not None and latest.version == 3 and "nowhere" not in latest.yaml


UNKNOWN_HOST = CANARY.replace("host: inference", "host: nosuchservice")


async def test_a_store_version_naming_an_unknown_host_is_refused_by_a_running_gateway(
    gateway: Gateway, store: Store
) -> None:
    await gateway.apply_config(CANARY, expected_version=0, dry_run=False)
    version = gateway.state.config.version
    # Refused before the store when applied through the gateway...
    with pytest.raises(ConfigError, match="'nosuchservice' is not a registered service"):
        await gateway.apply_config(UNKNOWN_HOST, expected_version=0, dry_run=False)
    # ...and when someone else writes it into the store: the last good config keeps routing.
    await routing(store).apply(UNKNOWN_HOST, expected_version=1)

    async def rejected() -> bool:
        last = gateway.state.last_rejection
        return last is not None and last.source == "store 'routing' v2"

    assert await eventually(rejected)
    last = gateway.state.last_rejection
    assert last is not None and "spec.http[0].route[0].destination.host" in last.error
    assert gateway.state.config.version == version and canary_rule(gateway)
    assert gateway.store_version == 1

    # One command puts the last good version back on top of the store (for every gateway).
    _, restored, _ = await gateway.rollback_config(expected_version=0, dry_run=False)
    assert restored == "store 'routing' v1"
    latest = await routing(store).current()
    v1 = await routing(store).get(1)
    assert latest is not None and latest.version == 3 and latest.yaml == v1.yaml
    assert gateway.store_version == 3 and canary_rule(gateway)


async def test_rollback_writes_the_previous_version_again(gateway: Gateway, store: Store) -> None:
    with pytest.raises(FailedPrecondition, match="nothing to roll back"):
        await gateway.rollback_config(expected_version=0, dry_run=False)
    await gateway.apply_config(CANARY, expected_version=0, dry_run=False)
    fault = CANARY.replace("timeout: 60s", "timeout: 5s", 1)  # the canary rule's
    await gateway.apply_config(fault, expected_version=0, dry_run=False)
    v1 = await routing(store).get(1)

    _, restored, overlay = await gateway.rollback_config(expected_version=0, dry_run=True)
    assert restored == "store 'routing' v1" and [d.ref for d in overlay] == [
        "VirtualService/inference"
    ]
    current = await routing(store).current()
    assert current is not None and current.version == 2  # a dry run writes nothing

    config, restored, _ = await gateway.rollback_config(expected_version=0, dry_run=False)
    latest = await routing(store).current()
    assert latest is not None and latest.version == 3 and latest.yaml == v1.yaml
    assert latest.applied_by == "gateway admin rollback to store 'routing' v1"
    assert gateway.store_version == 3 and gateway.state.config is config
    rule = next(r for r in config.virtual_services["inference"][0].http if r.name == "canary")
    assert rule.timeout == 60.0


async def test_rolling_back_the_first_store_version_leaves_the_directory_alone(
    gateway: Gateway, store: Store, config_dir: Path
) -> None:
    await gateway.apply_config(CANARY, expected_version=0, dry_run=False)
    assert canary_rule(gateway)
    config, restored, overlay = await gateway.rollback_config(expected_version=0, dry_run=False)
    assert restored == "the config directory alone (before store version 1)" and overlay == []
    latest = await routing(store).current()
    assert latest is not None and latest.version == 2 and latest.yaml == ""
    assert not canary_rule(gateway)
    assert config.source == f"{config_dir} + store 'routing' v2"
