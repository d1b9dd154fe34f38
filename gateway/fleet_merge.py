"""How the fleet's answers become one Triton server's: pure merges of per-worker replies.

The gateway sends model control, repository index, statistics, readiness and shared-memory
calls to every inference worker (gateway/fleet.py) and answers once, as a single Triton
server would. This module decides that one answer from the replies; it does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from protos.inference import grpc_service_pb2 as pb

T = TypeVar("T")

#: How bad a worker's failure is, for the one status the merged answer carries: a bug or
#: lost data first, then a worker that did not answer in time, one that could not serve,
#: and last the caller's own mistakes (every worker says the same about those).
_SEVERITY: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INTERNAL: 5,
    grpc.StatusCode.UNKNOWN: 5,
    grpc.StatusCode.DATA_LOSS: 5,
    grpc.StatusCode.DEADLINE_EXCEEDED: 4,
    grpc.StatusCode.UNAVAILABLE: 3,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 2,
    grpc.StatusCode.ABORTED: 2,
    grpc.StatusCode.CANCELLED: 2,
}
READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class Reply(Generic[T]):
    """One worker's answer: a value, or the status it failed with."""

    worker: str
    value: T | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    def describe(self) -> str:
        """``10.0.0.3:9001: UNAVAILABLE: load failed: ...``: a failure, by worker."""
        return f"{self.worker}: {self.code.name}: {self.message}"


@dataclass(frozen=True)
class Failure:
    """The merged answer is an error: its status and a message naming the workers."""

    code: grpc.StatusCode
    message: str


def worst(codes: Iterable[grpc.StatusCode]) -> grpc.StatusCode:
    """The most severe status of ``codes`` (the first of equals); OK for none."""
    found = grpc.StatusCode.OK
    rank = -1
    for code in codes:
        severity = _SEVERITY.get(code, 1)
        if severity > rank:
            found, rank = code, severity
    return found


def failed(replies: Sequence[Reply[T]], what: str) -> Failure | None:
    """``what`` failed when any worker failed: the worst status, every failure named."""
    failures = [r for r in replies if not r.ok]
    if not failures:
        return None
    listed = "; ".join(r.describe() for r in failures)
    return Failure(
        worst(r.code for r in failures),
        f"{what} failed on {len(failures)} of {len(replies)} workers: {listed}",
    )


def control(replies: Sequence[Reply[T]], action: str, model: str) -> Failure | None:
    """RepositoryModelLoad/Unload: done once every worker has done it."""
    return failed(replies, f"{action} of model {model!r}")


# -- RepositoryIndex -------------------------------------------------------------------------


def merge_index(replies: Sequence[Reply[pb.RepositoryIndexResponse]]) -> pb.RepositoryIndexResponse:
    """One index for the fleet.

    A version is READY when any replica has it ready, else LOADING when any is loading it,
    else UNAVAILABLE. The reason lists, by worker, each replica where it is not ready (a
    model-level row of one worker, "unloaded" say, stands for every version of that model
    the others list; a worker that lists nothing of it is "not in its repository"). A
    worker that did not answer is named in the reason of every row, READY ones too: its
    state is unknown, so no row can claim the whole fleet (``served_everywhere``).
    """
    answered = [r for r in replies if r.ok and r.value is not None]
    silent = [r for r in replies if not r.ok]
    # (name, version) -> [(worker, state, reason)], in worker order.
    rows: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    model_level: dict[str, list[tuple[str, str, str]]] = {}
    for reply in answered:
        assert reply.value is not None
        for row in reply.value.models:
            entry = (reply.worker, row.state, row.reason)
            if row.version:
                rows.setdefault((row.name, row.version), []).append(entry)
            else:
                model_level.setdefault(row.name, []).append(entry)
    for name, entries in model_level.items():
        versions = [key for key in rows if key[0] == name]
        if not versions:
            rows[(name, "")] = entries
            continue
        for key in versions:
            rows[key].extend(entries)
    response = pb.RepositoryIndexResponse()
    for (name, version), entries in sorted(rows.items(), key=lambda item: _index_order(item[0])):
        states = {state for _, state, _ in entries}
        state = READY if READY in states else LOADING if LOADING in states else UNAVAILABLE
        if len(states) == 1 and state not in (READY, LOADING):
            state = next(iter(states))
        notes = [
            f"{worker}: {row_state}" + (f": {reason}" if reason else "")
            for worker, row_state, reason in entries
            if row_state != READY
        ]
        # A worker that answered without the version (its repository poll has not seen it
        # yet, or it never had it) does not serve it either: named too.
        listed = {worker for worker, _, _ in entries}
        notes.extend(
            f"{r.worker}: not in its repository" for r in answered if r.worker not in listed
        )
        notes.extend(f"{r.worker}: did not answer: {r.code.name}: {r.message}" for r in silent)
        response.models.add(name=name, version=version, state=state, reason="; ".join(notes))
    return response


def served_everywhere(
    index: pb.RepositoryIndexResponse, model: str, version: str | None = None
) -> bool:
    """Whether a merged index says every inference worker serves ``model`` (``version``,
    else every version listed): READY with no worker named as lacking it. Right after a
    version is published, workers notice it each at its own repository poll; until the
    last one has, a call the ring sends to another is NOT_FOUND."""
    rows = [
        row
        for row in index.models
        if row.name == model and (version is None or row.version == version)
    ]
    return bool(rows) and all(row.state == READY and not row.reason for row in rows)


def _index_order(key: tuple[str, str]) -> tuple[str, int, str]:
    name, version = key
    return (name, int(version) if version.isdigit() else -1, version)


# -- ModelStatistics -------------------------------------------------------------------------

_DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
_BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


def _add(total: pb.StatisticDuration, part: pb.StatisticDuration) -> None:
    total.count += part.count
    total.ns += part.ns


def merge_statistics(
    replies: Sequence[Reply[pb.ModelStatisticsResponse]], name: str
) -> pb.ModelStatisticsResponse | Failure:
    """Per model and version, the sum over workers of counts and durations (the latest
    ``last_inference``; batch statistics summed per batch size; each worker's memory
    usage listed).

    A worker answering NOT_FOUND does not serve the model and adds nothing; the call is
    NOT_FOUND only when every worker says so. Any other failure fails the call, naming
    the worker: a sum that silently leaves a replica out would be wrong, not partial.
    """
    not_found = [r for r in replies if r.code is grpc.StatusCode.NOT_FOUND]
    if name and replies and len(not_found) == len(replies):
        return Failure(grpc.StatusCode.NOT_FOUND, not_found[0].message)
    trouble = failed([r for r in replies if r.code is not grpc.StatusCode.NOT_FOUND], "statistics")
    if trouble is not None:
        return trouble
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    batches: dict[tuple[str, str], dict[int, pb.InferBatchStatistics]] = {}
    for reply in replies:
        if not reply.ok or reply.value is None:
            continue
        for stats in reply.value.model_stats:
            key = (stats.name, stats.version)
            total = merged.get(key)
            if total is None:
                total = merged[key] = pb.ModelStatistics(name=stats.name, version=stats.version)
                batches[key] = {}
            total.last_inference = max(total.last_inference, stats.last_inference)
            total.inference_count += stats.inference_count
            total.execution_count += stats.execution_count
            for field in _DURATIONS:
                _add(getattr(total.inference_stats, field), getattr(stats.inference_stats, field))
            for batch in stats.batch_stats:
                into = batches[key].get(batch.batch_size)
                if into is None:
                    into = batches[key][batch.batch_size] = pb.InferBatchStatistics(
                        batch_size=batch.batch_size
                    )
                for field in _BATCH_DURATIONS:
                    _add(getattr(into, field), getattr(batch, field))
            total.memory_usage.extend(stats.memory_usage)
    response = pb.ModelStatisticsResponse()
    for key in sorted(merged, key=_index_order):
        total = merged[key]
        total.batch_stats.extend(batches[key][size] for size in sorted(batches[key]))
        response.model_stats.append(total)
    return response


# -- ModelReady ------------------------------------------------------------------------------


def any_ready(replies: Sequence[Reply[pb.ModelReadyResponse]]) -> bool | Failure:
    """Ready when a replica the gateway routes to has it ready; an error only when no
    replica answered at all (then nothing can be said)."""
    if any(r.ok and r.value is not None and r.value.ready for r in replies):
        return True
    if replies and not any(r.ok for r in replies):
        trouble = failed(replies, "ModelReady")
        assert trouble is not None
        return trouble
    return False


# -- system shared memory --------------------------------------------------------------------


def merge_raw_status(replies: Sequence[Reply[bytes]]) -> bytes | Failure:
    """SystemSharedMemoryStatus: every worker's regions, in one answer.

    Read as raw bytes (the gateway forwards shared-memory calls without their message
    types): a response is ``map<string, RegionStatus> regions = 1``, and protobuf parses
    concatenated messages as their merge, a map taking each key's last entry, so the
    concatenation is the union of the regions by name.
    """
    trouble = failed(replies, "SystemSharedMemoryStatus")
    if trouble is not None:
        return trouble
    return b"".join(r.value or b"" for r in replies)
