"""Training jobs in Elasticsearch: the JobStore protocol's round trips."""

from __future__ import annotations

from datetime import UTC, datetime

from elasticsearch import AsyncElasticsearch

from protos.meshserve.training.v1 import training_pb2
from registry.jobs import ElasticJobStore
from registry.schema import Indices


def job(
    job_id: str,
    minute: int,
    state: training_pb2.JobState.ValueType = training_pb2.JOB_STATE_QUEUED,
) -> training_pb2.Job:
    message = training_pb2.Job(id=job_id, state=state, step=minute * 10, total_steps=1000)
    message.spec.model_name = "mlp"
    message.spec.epochs = 3
    message.metrics["val_loss"] = 0.25
    message.created_at.FromDatetime(datetime(2026, 1, 1, 0, minute, tzinfo=UTC))
    return message


async def test_jobs_round_trip_upsert_and_list_newest_first(
    es: AsyncElasticsearch, indices: Indices
) -> None:
    store = ElasticJobStore(es, indices)
    await store.put(job("a", 1))
    await store.put(job("b", 3))
    await store.put(job("c", 2))
    assert await store.get("a") == job("a", 1)
    assert await store.get("missing") is None
    running = job("a", 1, training_pb2.JOB_STATE_RUNNING)
    await store.put(running)  # upsert by id
    assert await store.get("a") == running
    # A second worker (another client object) sees the same jobs: resume after a restart.
    other = ElasticJobStore(es, indices)
    assert [j.id for j in await other.list()] == ["b", "c", "a"]


async def test_an_empty_job_id_is_no_job(es: AsyncElasticsearch, indices: Indices) -> None:
    """GetJob, CancelJob and WatchJob with job_id "" failed INTERNAL (the client raises
    ValueError for an empty document id), counted against the training worker."""
    assert await ElasticJobStore(es, indices).get("") is None


async def test_events_from_a_sequence_in_order(es: AsyncElasticsearch, indices: Indices) -> None:
    store = ElasticJobStore(es, indices)
    for seq in (3, 1, 2, 4):
        event = training_pb2.JobEvent(sequence=seq)
        event.step_loss.step = seq * 10
        event.step_loss.loss = 1.0 / seq
        await store.append_event("a", event)
    await store.append_event("other", training_pb2.JobEvent(sequence=1))
    events = await store.events("a", from_event=2)
    assert [e.sequence for e in events] == [2, 3, 4]
    assert events[0].step_loss.step == 20
    # Re-appending after a crash overwrites rather than duplicates.
    await store.append_event("a", events[0])
    assert [e.sequence for e in await store.events("a", 1)] == [1, 2, 3, 4]
