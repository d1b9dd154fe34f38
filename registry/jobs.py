"""Training jobs and their event histories kept in Elasticsearch, shared by all training workers."""

from __future__ import annotations

import base64
import builtins
import logging
from datetime import UTC, datetime
from typing import Any

from elasticsearch import AsyncElasticsearch, NotFoundError
from google.protobuf.message import DecodeError

from mesh.errors import InvalidArgument
from protos.meshserve.training.v1 import training_pb2
from registry.instances import WallClock, format_time, utc_now
from registry.schema import Indices

log = logging.getLogger(__name__)

#: Jobs and events read in one search; older history needs paging.
MAX_RESULTS = 10_000


def _encode(message: training_pb2.Job | training_pb2.JobEvent) -> str:
    return base64.b64encode(message.SerializeToString(deterministic=True)).decode("ascii")


def _timestamp(job: training_pb2.Job, fallback: datetime) -> datetime:
    if job.HasField("created_at"):
        return job.created_at.ToDatetime(tzinfo=UTC)
    return fallback


def _event_id(job_id: str, sequence: int) -> str:
    return f"{job_id}/{sequence:012d}"


class ElasticJobStore:
    """Satisfies the training worker's ``JobStore`` protocol on Elasticsearch.

    Each job is one document (the serialized ``Job`` plus keyword/date fields to query on);
    each event is one document whose id is ``<job id>/<sequence>``, so re-appending an event
    after a crash overwrites rather than duplicates it. Writes refresh, so a ``list`` or
    ``events`` right after returns them (read-your-writes across workers).
    """

    def __init__(
        self, es: AsyncElasticsearch, indices: Indices, *, clock: WallClock = utc_now
    ) -> None:
        self._es = es
        self._jobs = indices.jobs
        self._events = indices.job_events
        self._clock = clock

    async def put(self, job: training_pb2.Job) -> None:
        """Inserts or replaces the job with ``job.id``."""
        if not job.id:
            raise InvalidArgument("a stored job needs an id")
        now = self._clock()
        await self._es.index(
            index=self._jobs,
            id=job.id,
            document={
                "job_id": job.id,
                "model": job.spec.model_name,
                "state": training_pb2.JobState.Name(job.state),
                "created_at": format_time(_timestamp(job, now)),
                "updated_at": format_time(now),
                "proto": _encode(job),
            },
            refresh=True,
        )

    async def get(self, job_id: str) -> training_pb2.Job | None:
        try:
            response = await self._es.get(index=self._jobs, id=job_id)
        except NotFoundError:
            return None
        return self._decode_job(response["_id"], response["_source"])

    async def list(self) -> builtins.list[training_pb2.Job]:
        """Every job, newest first (by creation time, then id for a stable order)."""
        response = await self._es.search(
            index=self._jobs,
            query={"match_all": {}},
            sort=[{"created_at": "desc"}, {"job_id": "desc"}],
            size=MAX_RESULTS,
            ignore_unavailable=True,
        )
        jobs = (self._decode_job(h["_id"], h["_source"]) for h in response["hits"]["hits"])
        return [job for job in jobs if job is not None]

    async def append_event(self, job_id: str, event: training_pb2.JobEvent) -> None:
        if event.sequence < 1:
            raise InvalidArgument(f"job {job_id!r} event sequence must start at 1")
        when = event.time.ToDatetime(tzinfo=UTC) if event.HasField("time") else self._clock()
        await self._es.index(
            index=self._events,
            id=_event_id(job_id, event.sequence),
            document={
                "job_id": job_id,
                "sequence": event.sequence,
                "time": format_time(when),
                "proto": _encode(event),
            },
            refresh=True,
        )

    async def events(self, job_id: str, from_event: int) -> builtins.list[training_pb2.JobEvent]:
        """Events with ``sequence >= from_event``, ascending."""
        response = await self._es.search(
            index=self._events,
            query={
                "bool": {
                    "filter": [
                        {"term": {"job_id": job_id}},
                        {"range": {"sequence": {"gte": from_event}}},
                    ]
                }
            },
            sort=[{"sequence": "asc"}],
            size=MAX_RESULTS,
            ignore_unavailable=True,
        )
        events = []
        for hit in response["hits"]["hits"]:
            event = training_pb2.JobEvent()
            try:
                event.ParseFromString(base64.b64decode(hit["_source"]["proto"]))
            except (DecodeError, KeyError, ValueError) as exc:
                log.warning("skipping malformed job event %r: %s", hit.get("_id"), exc)
                continue
            events.append(event)
        return events

    @staticmethod
    def _decode_job(doc_id: str, source: dict[str, Any]) -> training_pb2.Job | None:
        job = training_pb2.Job()
        try:
            job.ParseFromString(base64.b64decode(source["proto"]))
        except (DecodeError, KeyError, ValueError) as exc:
            log.warning("skipping malformed job document %r: %s", doc_id, exc)
            return None
        return job
