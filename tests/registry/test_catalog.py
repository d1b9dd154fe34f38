"""The model catalog: publishing, stages, promote/rollback and their concurrency control."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from elasticsearch import AsyncElasticsearch

from mesh.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from registry.catalog import (
    Catalog,
    Head,
    ModelVersion,
    Stage,
    plan_archive,
    plan_promote,
    plan_rollback,
)
from registry.schema import Indices

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def version(v: str, model: str = "resnet") -> ModelVersion:
    return ModelVersion(
        model=model,
        version=v,
        artifact_url=f"file:///repo/{model}/{v}/model.pt",
        created_at=T0 + timedelta(minutes=int(v)),
        metrics={"val_accuracy": 0.9 + int(v) / 100},
        lineage={"job_id": f"job-{v}", "dataset": {"name": "digits", "version": "1"}},
    )


# ---- pure transitions --------------------------------------------------------------------


def test_promote_remembers_the_previous_production() -> None:
    head = plan_promote(plan_promote(Head("m"), "1"), "2")
    assert head == Head("m", production="2", history=("1",), archived=("1",))
    assert [head.stage_of(v) for v in ("1", "2", "3")] == [
        Stage.ARCHIVED,
        Stage.PRODUCTION,
        Stage.CANDIDATE,
    ]
    assert plan_promote(head, "2") is head  # idempotent


def test_rollback_restores_and_archives() -> None:
    head = plan_rollback(plan_promote(plan_promote(Head("m"), "1"), "2"))
    assert head.production == "1" and head.history == ()
    assert head.stage_of("2") is Stage.ARCHIVED
    with pytest.raises(FailedPrecondition, match="no earlier production"):
        plan_rollback(head)


def test_expected_production_is_a_precondition() -> None:
    head = plan_promote(Head("m"), "1")
    with pytest.raises(Aborted, match="production is 1, expected 7"):
        plan_promote(head, "2", expected="7")
    assert plan_promote(head, "2", expected="1").production == "2"
    with pytest.raises(FailedPrecondition, match="in production"):
        plan_archive(head, "1")


# ---- on the store ------------------------------------------------------------------------


async def test_publish_list_promote_rollback(es: AsyncElasticsearch, indices: Indices) -> None:
    catalog = Catalog(es, indices)
    for v in ("1", "2", "3"):
        entry = await catalog.publish(version(v))
        assert entry.stage is Stage.CANDIDATE
    with pytest.raises(AlreadyExists, match="version 2"):
        await catalog.publish(version("2"))
    await catalog.promote("resnet", "1")
    await catalog.promote("resnet", "2", expected_production="1")
    listed = await catalog.list("resnet")
    assert [(e.version.version, e.stage) for e in listed] == [
        ("1", Stage.ARCHIVED),
        ("2", Stage.PRODUCTION),
        ("3", Stage.CANDIDATE),
    ]
    assert listed[1].version == version("2")  # metrics and lineage round-trip
    head = await catalog.rollback("resnet", expected_production="2")
    assert head.production == "1"
    production = await catalog.production("resnet")
    assert production is not None and production.version == "1"
    with pytest.raises(NotFound, match="version 9"):
        await catalog.promote("resnet", "9")


async def test_stale_expectation_aborts_and_changes_nothing(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    catalog = Catalog(es, indices)
    for v in ("1", "2", "3"):
        await catalog.publish(version(v))
    await catalog.promote("resnet", "1")
    # Two operators both saw "1" in production; the second one's promote must not win.
    await catalog.promote("resnet", "2", expected_production="1")
    with pytest.raises(Aborted, match="production is 2, expected 1"):
        await catalog.promote("resnet", "3", expected_production="1")
    with pytest.raises(Aborted, match="expected 1"):
        await catalog.rollback("resnet", expected_production="1")
    assert (await catalog.head("resnet")).production == "2"


async def test_concurrent_promotes_lose_no_update(es: AsyncElasticsearch, indices: Indices) -> None:
    """Racing writers re-read and retry on a seq_no conflict: no promotion is lost."""
    versions = [str(v) for v in range(1, 6)]
    for v in versions:
        await Catalog(es, indices).publish(version(v))
    # One catalog object per "operator"; each promote reads the head, then compares-and-sets.
    catalogs = [Catalog(es, indices, attempts=len(versions)) for _ in versions]
    await asyncio.gather(*(c.promote("resnet", v) for c, v in zip(catalogs, versions, strict=True)))
    head = await catalogs[0].head("resnet")
    # Every promotion happened exactly once: the winner is production, all others in history.
    assert head.production is not None
    assert sorted((*head.history, head.production)) == versions


async def test_conflicts_beyond_the_retry_budget_abort(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    for v in ("1", "2", "3"):
        await Catalog(es, indices).publish(version(v))
    racers = [Catalog(es, indices, attempts=1) for _ in range(3)]
    results = await asyncio.gather(
        *(c.promote("resnet", v) for c, v in zip(racers, ("1", "2", "3"), strict=True)),
        return_exceptions=True,
    )
    aborted = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, Aborted) and "concurrent" in str(r) for r in aborted)
    head = await racers[0].head("resnet")
    winners = len(results) - len(aborted)
    # Whatever interleaving happened, the head records exactly the winning promotions.
    assert len(head.history) + 1 == winners
