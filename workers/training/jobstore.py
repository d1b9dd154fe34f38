"""Where jobs and their event histories persist: the JobStore protocol and a local-disk store.

``LocalJobStore`` keeps one protobuf file per job (written to a temporary name and
renamed, so a reader sees the old or the new job, never half of one) and one
append-only event log per job: each line is a base64 serialized JobEvent. A crash
can tear only the last line; readers skip a line that does not decode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import os
import uuid
from pathlib import Path
from typing import Protocol

from google.protobuf.message import DecodeError

from protos.meshserve.training.v1 import training_pb2


class JobStore(Protocol):
    """Persistent jobs and events. The registry provides an Elasticsearch implementation."""

    async def put(self, job: training_pb2.Job) -> None:
        """Inserts or replaces ``job`` by its id."""

    async def get(self, job_id: str) -> training_pb2.Job | None:
        """The job, or None when there is none with that id."""

    async def list(self) -> builtins.list[training_pb2.Job]:
        """Every job, newest (by created_at) first."""

    async def unfinished(self) -> builtins.list[training_pb2.Job]:
        """Jobs not in a final state, oldest first: the ones a worker may resume."""

    async def append_event(self, job_id: str, event: training_pb2.JobEvent) -> None:
        """Appends one event; sequences are assigned by the caller, 1, 2, 3, ..."""

    async def events(self, job_id: str, from_event: int) -> builtins.list[training_pb2.JobEvent]:
        """Events with sequence >= from_event, ascending."""


def _check_id(job_id: str) -> str:
    # Ids become file names: refuse anything that could climb out of the directory.
    if not job_id or not all(c.isalnum() or c in "-_" for c in job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


class LocalJobStore:
    """A JobStore in a local directory; safe for one worker process."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # One lock serialises writers so appends from concurrent jobs never interleave.
        self._lock = asyncio.Lock()

    def _job_path(self, job_id: str) -> Path:
        return self.directory / f"{_check_id(job_id)}.job"

    def _events_path(self, job_id: str) -> Path:
        return self.directory / f"{_check_id(job_id)}.events"

    async def put(self, job: training_pb2.Job) -> None:
        data = job.SerializeToString()
        path = self._job_path(job.id)
        async with self._lock:
            await asyncio.to_thread(_write_atomic, path, data)

    async def get(self, job_id: str) -> training_pb2.Job | None:
        try:
            path = self._job_path(job_id)
        except ValueError:
            return None
        return await asyncio.to_thread(_read_job, path)

    async def list(self) -> builtins.list[training_pb2.Job]:
        def read_all() -> list[training_pb2.Job]:
            jobs = [_read_job(p) for p in self.directory.glob("*.job")]
            return [j for j in jobs if j is not None]

        jobs = await asyncio.to_thread(read_all)
        jobs.sort(key=lambda j: (j.created_at.seconds, j.created_at.nanos, j.id), reverse=True)
        return jobs

    async def unfinished(self) -> builtins.list[training_pb2.Job]:
        final = (
            training_pb2.JOB_STATE_SUCCEEDED,
            training_pb2.JOB_STATE_FAILED,
            training_pb2.JOB_STATE_CANCELLED,
        )
        return [j for j in reversed(await self.list()) if j.state not in final]

    async def append_event(self, job_id: str, event: training_pb2.JobEvent) -> None:
        line = base64.b64encode(event.SerializeToString()) + b"\n"
        path = self._events_path(job_id)
        async with self._lock:
            await asyncio.to_thread(_append, path, line)

    async def events(self, job_id: str, from_event: int) -> builtins.list[training_pb2.JobEvent]:
        try:
            path = self._events_path(job_id)
        except ValueError:
            return []
        return await asyncio.to_thread(_read_events, path, from_event)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_job(path: Path) -> training_pb2.Job | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    job = training_pb2.Job()
    job.ParseFromString(data)
    return job


def _append(path: Path, line: bytes) -> None:
    # A torn previous line (crash mid-write) must not swallow this one: start it on a
    # fresh line if the file does not end with a newline.
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _read_events(path: Path, from_event: int) -> builtins.list[training_pb2.JobEvent]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    events: list[training_pb2.JobEvent] = []
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            event = training_pb2.JobEvent.FromString(base64.b64decode(line, validate=True))
        except (binascii.Error, DecodeError):
            continue  # a torn line from a crash mid-append
        if event.sequence >= from_event:
            events.append(event)
    events.sort(key=lambda e: e.sequence)
    return events
