"""The fleet's merged answers, as tables: pure, no sockets (gateway/fleet_merge.py)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from gateway.fleet_merge import (
    Failure,
    Reply,
    any_ready,
    control,
    merge_index,
    merge_raw_status,
    merge_statistics,
    served_everywhere,
    worst,
)
from protos.inference import grpc_service_pb2 as pb

A, B, C = "10.0.0.1:9001", "10.0.0.2:9001", "10.0.0.3:9001"
S = grpc.StatusCode


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([], S.OK),
        ([S.NOT_FOUND], S.NOT_FOUND),
        ([S.NOT_FOUND, S.UNAVAILABLE], S.UNAVAILABLE),
        ([S.UNAVAILABLE, S.DEADLINE_EXCEEDED], S.DEADLINE_EXCEEDED),
        ([S.DEADLINE_EXCEEDED, S.INTERNAL, S.UNAVAILABLE], S.INTERNAL),
        ([S.INVALID_ARGUMENT, S.NOT_FOUND], S.INVALID_ARGUMENT),  # equals: the first
        ([S.RESOURCE_EXHAUSTED, S.FAILED_PRECONDITION], S.RESOURCE_EXHAUSTED),
    ],
)
def test_the_worst_status_wins(codes: list[grpc.StatusCode], expected: grpc.StatusCode) -> None:
    assert worst(codes) is expected


def test_control_succeeds_only_when_every_worker_did() -> None:
    assert control([Reply(A, b""), Reply(B, b"")], "load", "simple") is None
    failure = control(
        [
            Reply(A, b""),
            Reply(B, code=S.UNAVAILABLE, message="load failed: RuntimeError: stoll"),
            Reply(C, code=S.NOT_FOUND, message="model 'simple' is not in the repository"),
        ],
        "load",
        "simple",
    )
    assert failure == Failure(
        S.UNAVAILABLE,
        "load of model 'simple' failed on 2 of 3 workers: "
        f"{B}: UNAVAILABLE: load failed: RuntimeError: stoll; "
        f"{C}: NOT_FOUND: model 'simple' is not in the repository",
    )


def index(*rows: tuple[str, str, str, str]) -> pb.RepositoryIndexResponse:
    response = pb.RepositoryIndexResponse()
    for name, version, state, reason in rows:
        response.models.add(name=name, version=version, state=state, reason=reason)
    return response


def rows(response: pb.RepositoryIndexResponse) -> list[tuple[str, str, str, str]]:
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # Served by both: READY, nothing to say.
        (
            index(("demo", "1", "READY", "")),
            index(("demo", "1", "READY", "")),
            [("demo", "1", "READY", "")],
        ),
        # Served by one: READY (any replica serves it), the other replica named.
        (
            index(("demo", "1", "READY", ""), ("demo", "2", "READY", "")),
            index(("demo", "", "UNAVAILABLE", "unloaded")),
            [
                ("demo", "1", "READY", f"{B}: UNAVAILABLE: unloaded"),
                ("demo", "2", "READY", f"{B}: UNAVAILABLE: unloaded"),
            ],
        ),
        # Unloaded everywhere: one model-level row with every replica's reason.
        (
            index(("simple", "", "UNAVAILABLE", "unloaded")),
            index(("simple", "", "UNAVAILABLE", "unloaded")),
            [
                (
                    "simple",
                    "",
                    "UNAVAILABLE",
                    f"{A}: UNAVAILABLE: unloaded; {B}: UNAVAILABLE: unloaded",
                )
            ],
        ),
        # Loading on one, failed on the other: LOADING; the failure's cause is kept.
        (
            index(("m", "3", "LOADING", "")),
            index(("m", "3", "UNAVAILABLE", "load failed: RuntimeError: stoll")),
            [
                (
                    "m",
                    "3",
                    "LOADING",
                    f"{A}: LOADING; {B}: UNAVAILABLE: load failed: RuntimeError: stoll",
                )
            ],
        ),
        # Versions sort numerically, models by name; each worker's own models all show,
        # and a worker without a model is named (it does not serve it: say a poll has not
        # seen a newly published version yet).
        (
            index(("b", "10", "READY", ""), ("b", "9", "READY", "")),
            index(("a", "1", "READY", "")),
            [
                ("a", "1", "READY", f"{A}: not in its repository"),
                ("b", "9", "READY", f"{B}: not in its repository"),
                ("b", "10", "READY", f"{B}: not in its repository"),
            ],
        ),
    ],
)
def test_index_merges_replicas(
    a: pb.RepositoryIndexResponse,
    b: pb.RepositoryIndexResponse,
    expected: list[tuple[str, str, str, str]],
) -> None:
    assert rows(merge_index([Reply(A, a), Reply(B, b)])) == expected


def test_index_names_a_silent_worker_on_every_row() -> None:
    merged = merge_index(
        [
            Reply(
                A, index(("demo", "1", "READY", ""), ("x", "1", "UNAVAILABLE", "not loaded yet"))
            ),
            Reply(B, code=S.UNAVAILABLE, message="connection refused"),
        ]
    )
    silent = f"{B}: did not answer: UNAVAILABLE: connection refused"
    assert rows(merged) == [
        # READY on the one that answered; the silent one may lack it, so it is named.
        ("demo", "1", "READY", silent),
        ("x", "1", "UNAVAILABLE", f"{A}: UNAVAILABLE: not loaded yet; {silent}"),
    ]
    assert not served_everywhere(merged, "demo")


@pytest.mark.parametrize(
    ("a", "b", "version", "expected"),
    [
        (index(("demo", "1", "READY", "")), index(("demo", "1", "READY", "")), None, True),
        # B's poll has not seen the new model yet: a call the ring sends there fails.
        (index(("demo", "1", "READY", "")), index(), None, False),
        (index(("demo", "1", "READY", "")), index(("demo", "1", "LOADING", "")), None, False),
        # Every version listed must be everywhere, unless one version is asked about.
        (
            index(("demo", "1", "READY", ""), ("demo", "2", "READY", "")),
            index(("demo", "1", "READY", "")),
            None,
            False,
        ),
        (
            index(("demo", "1", "READY", ""), ("demo", "2", "READY", "")),
            index(("demo", "1", "READY", "")),
            "1",
            True,
        ),
        # A model nobody lists is not served anywhere.
        (index(("x", "1", "READY", "")), index(("x", "1", "READY", "")), None, False),
    ],
)
def test_served_everywhere_needs_every_worker_ready(
    a: pb.RepositoryIndexResponse,
    b: pb.RepositoryIndexResponse,
    version: str | None,
    expected: bool,
) -> None:
    merged = merge_index([Reply(A, a), Reply(B, b)])
    assert served_everywhere(merged, "demo", version) is expected


def duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=count, ns=ns)


def stats(name: str, version: str, n: int, last: int, *batches: int) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=last,
        inference_count=n,
        execution_count=len(batches),
        inference_stats=pb.InferStatistics(
            success=duration(n, 1000 * n), queue=duration(n, 10 * n), fail=duration(1, 5)
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(1, 100 * size))
            for size in batches
        ],
        memory_usage=[pb.MemoryUsage(type="CPU", id=0, byte_size=1000)],
    )


def test_statistics_sum_per_model_and_version() -> None:
    a = pb.ModelStatisticsResponse(
        model_stats=[stats("demo", "1", 5, 100, 1, 4), stats("demo", "2", 1, 50, 1)]
    )
    b = pb.ModelStatisticsResponse(model_stats=[stats("demo", "1", 7, 300, 4, 8)])
    merged = merge_statistics([Reply(A, a), Reply(B, b)], "demo")
    assert isinstance(merged, pb.ModelStatisticsResponse)
    v1, v2 = merged.model_stats
    assert (v1.name, v1.version, v2.version) == ("demo", "1", "2")
    assert v1.inference_count == 12 and v1.execution_count == 4
    assert v1.last_inference == 300  # the latest, not a sum
    assert v1.inference_stats.success == duration(12, 12000)
    assert v1.inference_stats.queue == duration(12, 120)
    assert v1.inference_stats.fail == duration(2, 10)
    assert [(s.batch_size, s.compute_infer.count, s.compute_infer.ns) for s in v1.batch_stats] == [
        (1, 1, 100),
        (4, 2, 800),
        (8, 1, 800),
    ]
    assert len(v1.memory_usage) == 2  # one per worker
    assert v2.inference_count == 1


def test_statistics_skip_workers_without_the_model_and_fail_on_any_other_error() -> None:
    some = pb.ModelStatisticsResponse(model_stats=[stats("demo", "1", 3, 1)])
    gone = Reply[pb.ModelStatisticsResponse](B, code=S.NOT_FOUND, message="unknown model 'demo'")
    merged = merge_statistics([Reply(A, some), gone], "demo")
    assert isinstance(merged, pb.ModelStatisticsResponse)
    assert merged.model_stats[0].inference_count == 3
    assert merge_statistics([gone, gone], "demo") == Failure(S.NOT_FOUND, "unknown model 'demo'")
    down = Reply[pb.ModelStatisticsResponse](B, code=S.UNAVAILABLE, message="connection refused")
    failure = merge_statistics([Reply(A, some), down], "demo")
    assert failure == Failure(
        S.UNAVAILABLE, f"statistics failed on 1 of 2 workers: {B}: UNAVAILABLE: connection refused"
    )


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        ([Reply(A, pb.ModelReadyResponse(ready=True)), Reply(B, pb.ModelReadyResponse())], True),
        ([Reply(A, pb.ModelReadyResponse()), Reply(B, pb.ModelReadyResponse())], False),
        (
            [
                Reply(A, code=S.UNAVAILABLE, message="connection refused"),
                Reply(B, pb.ModelReadyResponse(ready=True)),
            ],
            True,
        ),
        (
            [Reply(A, code=S.UNAVAILABLE, message="refused"), Reply(B, pb.ModelReadyResponse())],
            False,
        ),
        (
            [Reply(A, code=S.UNAVAILABLE, message="refused")],
            Failure(
                S.UNAVAILABLE, f"ModelReady failed on 1 of 1 workers: {A}: UNAVAILABLE: refused"
            ),
        ),
    ],
)
def test_ready_when_any_routable_replica_is(
    replies: list[Reply[pb.ModelReadyResponse]], expected: bool | Failure
) -> None:
    assert any_ready(replies) == expected


def regions(**sizes: int) -> bytes:
    """A status response by wire shape: SystemSharedMemoryStatusResponse is
    ``map<string, RegionStatus> regions = 1``, as Struct is ``map<string, Value> fields =
    1``, so a Struct stands in for it (the gateway forwards these calls as bytes)."""
    message = Struct()
    message.update(sizes)
    return message.SerializeToString()


def test_shared_memory_status_is_the_union_of_the_workers_regions() -> None:
    merged = merge_raw_status([Reply(A, regions(input=64)), Reply(B, regions(output=32))])
    assert isinstance(merged, bytes)
    assert dict(Struct.FromString(merged)) == {"input": 64, "output": 32}
    failure = merge_raw_status(
        [Reply(A, regions(input=64)), Reply(B, code=S.UNIMPLEMENTED, message="Method not found!")]
    )
    assert failure == Failure(
        S.UNIMPLEMENTED,
        f"SystemSharedMemoryStatus failed on 1 of 2 workers: {B}: UNIMPLEMENTED: Method not found!",
    )
