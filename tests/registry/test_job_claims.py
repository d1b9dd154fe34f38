"""Job claims: one training worker per job, lapsed claims taken over, races decided by CAS."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from elasticsearch import AsyncElasticsearch

from protos.meshserve.training.v1 import training_pb2
from registry.jobs import Claim, ElasticJobClaims, ElasticJobStore, may_claim
from registry.schema import Indices

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_may_claim_free_own_or_lapsed() -> None:
    live = Claim("j", "a", T0 + timedelta(seconds=5))
    assert may_claim(None, "b", T0)
    assert may_claim(live, "a", T0)
    assert not may_claim(live, "b", T0 + timedelta(seconds=4.9))
    assert may_claim(live, "b", T0 + timedelta(seconds=5))


async def test_claims_exclude_renew_lapse_and_release(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    clock = Clock()
    a = ElasticJobClaims(es, indices, "worker-a", ttl=5, clock=clock)
    b = ElasticJobClaims(es, indices, "worker-b", ttl=5, clock=clock)
    assert await a.claim("j1")
    assert not await b.claim("j1")  # live and someone else's
    assert not await b.renew("j1")
    clock.now += timedelta(seconds=4)
    assert await a.renew("j1")  # now lasts until T0 + 9 s
    clock.now += timedelta(seconds=4)
    assert not await b.claim("j1")
    holder = await b.holder("j1")
    assert holder is not None and holder.owner == "worker-a"
    assert holder.expires_at == T0 + timedelta(seconds=9)
    assert holder.claimed_at == T0  # renewals keep it

    clock.now += timedelta(seconds=2)  # a stopped renewing: the claim lapsed
    assert await b.claim("j1")
    taken = await a.holder("j1")
    assert taken is not None and taken.claimed_at == clock.now
    assert not await a.renew("j1")  # a learns it lost the job
    await a.release("j1")  # not a's any more: must not free b's claim
    assert not await a.claim("j1")
    await b.release("j1")
    assert await b.holder("j1") is None
    assert await a.claim("j1")  # free again


async def test_a_race_for_a_lapsed_claim_has_one_winner(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    clock = Clock()
    dead = ElasticJobClaims(es, indices, "dead", ttl=1, clock=clock)
    assert await dead.claim("j")
    clock.now += timedelta(seconds=2)
    rivals = [ElasticJobClaims(es, indices, f"w{i}", ttl=5, clock=clock) for i in range(4)]
    won = await asyncio.gather(*(r.claim("j") for r in rivals))
    assert sum(won) == 1
    holder = await rivals[0].holder("j")
    assert holder is not None and holder.owner == f"w{won.index(True)}"


async def test_unfinished_jobs_oldest_first(es: AsyncElasticsearch, indices: Indices) -> None:
    store = ElasticJobStore(es, indices)
    for job_id, minute, state in [
        ("new", 3, training_pb2.JOB_STATE_QUEUED),
        ("done", 1, training_pb2.JOB_STATE_SUCCEEDED),
        ("old", 0, training_pb2.JOB_STATE_RUNNING),
        ("gone", 2, training_pb2.JOB_STATE_CANCELLED),
    ]:
        job = training_pb2.Job(id=job_id, state=state)
        job.created_at.FromDatetime(T0 + timedelta(minutes=minute))
        await store.put(job)
    assert [j.id for j in await store.unfinished()] == ["old", "new"]
