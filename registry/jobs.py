"""Training jobs and their event histories kept in Elasticsearch, shared by all training workers."""

from __future__ import annotations

import base64
import builtins
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from elasticsearch import AsyncElasticsearch, ConflictError, NotFoundError
from google.protobuf.message import DecodeError

from mesh.errors import InvalidArgument
from protos.meshserve.training.v1 import training_pb2
from registry.connect import unreachable_as_unavailable
from registry.instances import WallClock, format_time, parse_time, utc_now
from registry.schema import Indices

log = logging.getLogger(__name__)

#: Jobs and events read in one search; older history needs paging.
MAX_RESULTS = 10_000
#: Final states: a job in one of these is never run (or claimed) again.
FINAL_STATES = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")
#: Seconds a job claim lasts without renewal.
DEFAULT_CLAIM_TTL = 10.0


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

    @unreachable_as_unavailable("the job store")
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

    @unreachable_as_unavailable("the job store")
    async def get(self, job_id: str) -> training_pb2.Job | None:
        if not job_id:
            return None  # no document has an empty id (the client raises ValueError)
        try:
            response = await self._es.get(index=self._jobs, id=job_id)
        except NotFoundError:
            return None
        return self._decode_job(response["_id"], response["_source"])

    @unreachable_as_unavailable("the job store")
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

    @unreachable_as_unavailable("the job store")
    async def unfinished(self) -> builtins.list[training_pb2.Job]:
        """Jobs not in a final state, oldest first: the ones a worker may resume."""
        response = await self._es.search(
            index=self._jobs,
            query={"bool": {"must_not": [{"terms": {"state": list(FINAL_STATES)}}]}},
            sort=[{"created_at": "asc"}, {"job_id": "asc"}],
            size=MAX_RESULTS,
            ignore_unavailable=True,
        )
        jobs = (self._decode_job(h["_id"], h["_source"]) for h in response["hits"]["hits"])
        return [job for job in jobs if job is not None]

    @unreachable_as_unavailable("the job store")
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

    @unreachable_as_unavailable("the job store")
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


# ---- claims: which worker runs a job ----------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One job's claim document: ``owner`` runs the job until ``expires_at`` unless renewed."""

    job_id: str
    owner: str
    expires_at: datetime
    #: When ``owner`` took the job (kept across its renewals).
    claimed_at: datetime | None = None


def may_claim(current: Claim | None, owner: str, now: datetime) -> bool:
    """Whether ``owner`` may (re)take a job whose claim is ``current``: free, its own, or lapsed."""
    return current is None or current.owner == owner or current.expires_at <= now


class ElasticJobClaims:
    """Leases on jobs, so that of several training workers sharing one store exactly one runs
    each job, and a job whose worker died is taken over by another.

    One document per job in ``<prefix>-job-claims`` (id = job id) names the owner and when
    its lease ends. Taking a claim is ``op_type=create`` when there is none, else a
    compare-and-set (``if_seq_no``/``if_primary_term``) of the document just read, allowed
    only when it is ours or lapsed — so two workers racing for a lapsed claim cannot both
    win. Renewal is the same compare-and-set, refused when someone else holds the claim:
    that is how a worker learns it lost a job (it was too slow to renew) and must stop.
    Lapse is judged on the claimer's wall clock against ``expires_at`` written by the
    owner's, so clocks must agree to well within the TTL (as for instance leases).
    """

    def __init__(
        self,
        es: AsyncElasticsearch,
        indices: Indices,
        owner: str,
        *,
        ttl: float = DEFAULT_CLAIM_TTL,
        clock: WallClock = utc_now,
    ) -> None:
        if not owner:
            raise InvalidArgument("a job claim needs an owner id")
        if ttl <= 0:
            raise InvalidArgument(f"job claim TTL must be positive, got {ttl}")
        self._es = es
        self._index = indices.job_claims
        self.owner = owner
        self.ttl_seconds = ttl
        self._clock = clock

    #: Other workers may hold claims here: adopting jobs and watching by polling make sense.
    shared = True

    async def holder(self, job_id: str) -> Claim | None:
        """The job's current claim (lapsed or not), or None."""
        found = await self._read(job_id)
        return None if found is None else found[0]

    async def claim(self, job_id: str) -> bool:
        """Takes (or renews) the job's claim; False when another worker holds a live one."""
        return await self._take(job_id, renew_only=False)

    async def renew(self, job_id: str) -> bool:
        """Extends our claim; False when it is no longer ours (taken over, or removed)."""
        return await self._take(job_id, renew_only=True)

    async def release(self, job_id: str) -> None:
        """Gives the claim up (the job finished, or this worker stops); only if still ours."""
        found = await self._read(job_id)
        if found is None or found[0].owner != self.owner:
            return
        seq_no, primary_term = found[1]
        # Taken over or gone meanwhile: nothing of ours is left to release.
        with contextlib.suppress(ConflictError, NotFoundError):
            await self._es.delete(
                index=self._index,
                id=job_id,
                if_seq_no=seq_no,
                if_primary_term=primary_term,
                refresh=True,
            )

    async def _read(self, job_id: str) -> tuple[Claim, tuple[int, int]] | None:
        try:
            response = await self._es.get(index=self._index, id=job_id)
        except NotFoundError:
            return None
        source = response["_source"]
        try:
            claim = Claim(
                job_id=job_id,
                owner=str(source["owner"]),
                expires_at=parse_time(source.get("expires_at"), "expires_at"),
                claimed_at=parse_time(source.get("claimed_at"), "claimed_at"),
            )
        except (KeyError, ValueError) as exc:
            # Unreadable: treat as lapsed (overwritable by compare-and-set), never crash.
            log.warning("malformed job claim %r: %s", job_id, exc)
            claim = Claim(job_id, "", datetime.min.replace(tzinfo=UTC))
        return claim, (response["_seq_no"], response["_primary_term"])

    async def _take(self, job_id: str, *, renew_only: bool) -> bool:
        now = self._clock()
        found = await self._read(job_id)
        if renew_only and (found is None or found[0].owner != self.owner):
            return False
        if found is not None and not may_claim(found[0], self.owner, now):
            return False
        mine = found is not None and found[0].owner == self.owner
        claimed_at = found[0].claimed_at if mine and found is not None else None
        document = {
            "job_id": job_id,
            "owner": self.owner,
            "claimed_at": format_time(claimed_at or now),
            "renewed_at": format_time(now),
            "expires_at": format_time(now + timedelta(seconds=self.ttl_seconds)),
            "ttl_ms": int(self.ttl_seconds * 1000),
        }
        try:
            if found is None:
                await self._es.index(
                    index=self._index, id=job_id, document=document, op_type="create", refresh=True
                )
            else:
                seq_no, primary_term = found[1]
                await self._es.index(
                    index=self._index,
                    id=job_id,
                    document=document,
                    if_seq_no=seq_no,
                    if_primary_term=primary_term,
                    refresh=True,
                )
        except ConflictError:
            return False  # another worker wrote first: it holds the job
        return True
