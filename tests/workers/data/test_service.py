"""The DataService over real gRPC on loopback: every RPC, every error, cancelled uploads."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from mesh.server.app import ServerSettings
from mesh.server.testing import serve
from protos.meshserve.data.v1 import data_pb2 as pb
from protos.meshserve.data.v1 import data_pb2_grpc
from tests.workers.data.conftest import Server, columns, committed_files, header
from workers.data import wire
from workers.data.service import SERVICE_NAME, data_service
from workers.data.storage import DatasetStore, chunk_paths


async def upload(
    server: Server, n: int = 100, hdr: pb.DatasetHeader | None = None, per_message: int = 7
) -> pb.Dataset:
    requests = wire.upload_requests(hdr or header(), columns(n), records_per_message=per_message)
    return await server.stub.CreateDataset(_aiter(requests))


async def _aiter(
    items: Iterable[pb.CreateDatasetRequest],
) -> AsyncIterator[pb.CreateDatasetRequest]:
    for item in items:
        yield item


async def collect(server: Server, **fields: object) -> list[pb.Batch]:
    request = pb.StreamBatchesRequest(dataset="toy", **fields)  # type: ignore[arg-type]
    return [batch async for batch in server.stub.StreamBatches(request)]


async def status_of(awaitable: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if isinstance(awaitable, grpc.aio.UnaryStreamCall):
            async for _ in awaitable:
                pass
        else:
            await awaitable  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


# -- create, get, list, delete -----------------------------------------------------------


async def test_upload_then_get_list_delete(server: Server) -> None:
    created = await upload(server, 100, header(validation_fraction=0.2, test_fraction=0.1))
    assert (created.name, created.version, created.num_examples) == ("toy", "1", 100)
    assert (created.num_train, created.num_validation, created.num_test) == (70, 20, 10)
    assert created.source == "upload" and created.description == "a toy dataset"
    assert len(created.sha256) == 64 and created.size_bytes == 100 * (12 + 8)
    assert created.schema == header().schema
    assert [s.name for s in created.feature_stats] == ["x"]
    assert created.created_at.seconds > 0

    assert await server.stub.GetDataset(pb.GetDatasetRequest(name="toy")) == created
    second = await upload(server, 10)
    assert second.version == "2"
    listed = await server.stub.ListDatasets(pb.ListDatasetsRequest())
    assert [(d.name, d.version) for d in listed.datasets] == [("toy", "1"), ("toy", "2")]
    only = await server.stub.ListDatasets(pb.ListDatasetsRequest(name="missing"))
    assert list(only.datasets) == []

    await server.stub.DeleteDataset(pb.DeleteDatasetRequest(name="toy", version="1"))
    code, details = await status_of(
        server.stub.GetDataset(pb.GetDatasetRequest(name="toy", version="1"))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "'toy' has no version '1'" in details
    assert (await server.stub.GetDataset(pb.GetDatasetRequest(name="toy"))).version == "2"


@pytest.mark.parametrize(
    ("request_fields", "x_shape", "num_classes", "source"),
    [
        (
            {"blobs": pb.BlobsSource(num_examples=300, num_classes=4, num_features=5)},
            [5],
            4,
            "blobs",
        ),
        ({"spirals": pb.SpiralsSource(num_examples=200)}, [2], 2, "spirals"),
        ({"regression": pb.RegressionSource(num_examples=150, noise=0.0)}, [4], 0, "regression"),
    ],
)
async def test_builtin_datasets_are_created_and_stream(
    server: Server,
    request_fields: dict[str, object],
    x_shape: list[int],
    num_classes: int,
    source: str,
) -> None:
    request = pb.CreateBuiltinDatasetRequest(name="toy", seed=3, **request_fields)  # type: ignore[arg-type]
    created = await server.stub.CreateBuiltinDataset(request)
    assert created.source == f"builtin:{source}"
    assert list(created.schema.features[0].shape) == x_shape
    assert created.schema.num_classes == num_classes
    again = await server.stub.CreateBuiltinDataset(request)
    assert again.sha256 == created.sha256  # same seed, same bytes
    batches = await collect(server, split=pb.SPLIT_ALL, batch_size=64)
    assert sum(b.size for b in batches) == created.num_examples


async def test_digits_without_scikit_learn_is_failed_precondition(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    request = pb.CreateBuiltinDatasetRequest(name="digits", digits=pb.DigitsSource())
    code, details = await status_of(server.stub.CreateBuiltinDataset(request))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'datasets' extra" in details


async def test_builtin_errors(server: Server) -> None:
    code, details = await status_of(
        server.stub.CreateBuiltinDataset(pb.CreateBuiltinDatasetRequest(name="x"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "source must be set" in details
    blobs = pb.BlobsSource(num_examples=10)
    await server.stub.CreateBuiltinDataset(
        pb.CreateBuiltinDatasetRequest(name="b", version="v", blobs=blobs)
    )
    code, details = await status_of(
        server.stub.CreateBuiltinDataset(
            pb.CreateBuiltinDatasetRequest(name="b", version="v", blobs=blobs)
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "'b' version 'v'" in details


# -- upload errors ------------------------------------------------------------------------


def _chunk(x: np.ndarray, y: np.ndarray) -> pb.CreateDatasetRequest:
    return pb.CreateDatasetRequest(
        chunk=pb.RecordChunk(
            tensors=[wire.tensor_from_array("x", x), wire.tensor_from_array("y", y)]
        )
    )


GOOD = _chunk(np.zeros((5, 3), np.float32), np.zeros(5, np.int64))


@pytest.mark.parametrize(
    ("requests", "code", "message"),
    [
        (
            [pb.CreateDatasetRequest(header=header(name=""))],
            "INVALID_ARGUMENT",
            "must not be empty",
        ),
        (
            [
                pb.CreateDatasetRequest(header=header()),
                GOOD,
                _chunk(np.zeros((5, 3), np.float64), np.zeros(5, np.int64)),
            ],
            "INVALID_ARGUMENT",
            "record 5: tensor 'x' has dtype FP64, schema says FP32",
        ),
        (
            [
                pb.CreateDatasetRequest(header=header()),
                GOOD,
                GOOD,
                _chunk(np.zeros((5, 2), np.float32), np.zeros(5, np.int64)),
            ],
            "INVALID_ARGUMENT",
            "record 10: tensor 'x' has shape [5, 2], schema says [N, 3]",
        ),
        ([GOOD], "INVALID_ARGUMENT", "first message of an upload must be a header"),
        (
            [pb.CreateDatasetRequest(header=header()), pb.CreateDatasetRequest(header=header())],
            "INVALID_ARGUMENT",
            "exactly one header",
        ),
        ([], "INVALID_ARGUMENT", "empty upload"),
        ([pb.CreateDatasetRequest(header=header())], "INVALID_ARGUMENT", "has no records"),
        ([pb.CreateDatasetRequest()], "INVALID_ARGUMENT", "header or a chunk"),
        (
            [pb.CreateDatasetRequest(header=header(validation_fraction=1.5))],
            "INVALID_ARGUMENT",
            "validation_fraction must be in [0, 1)",
        ),
    ],
)
async def test_bad_uploads_fail_and_leave_nothing(
    server: Server, requests: list[pb.CreateDatasetRequest], code: str, message: str
) -> None:
    status, details = await status_of(server.stub.CreateDataset(_aiter(requests)))
    assert status == grpc.StatusCode[code]
    assert message in details
    assert committed_files(server.root) == []


async def test_duplicate_upload_is_already_exists(server: Server) -> None:
    await upload(server, 10, header(version="v1"))
    code, details = await status_of(
        server.stub.CreateDataset(_aiter(wire.upload_requests(header(version="v1"), columns(10))))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "'toy' version 'v1'" in details
    listed = await server.stub.ListDatasets(pb.ListDatasetsRequest())
    assert [d.version for d in listed.datasets] == ["v1"]


async def _poll(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_cancelled_upload_leaves_no_dataset_and_no_temporary_files(server: Server) -> None:
    async def requests() -> AsyncIterator[pb.CreateDatasetRequest]:
        for item in wire.upload_requests(header(), columns(200), records_per_message=10):
            yield item
        await asyncio.Event().wait()  # never half-close: the client cancels instead

    call = server.stub.CreateDataset(requests())
    # Wait until the server has staged data, so the cancel interrupts real work.
    await _poll(lambda: committed_files(server.root), "the server to stage chunks")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await _poll(lambda: committed_files(server.root) == [], "staging to be cleaned up")
    assert list((await server.stub.ListDatasets(pb.ListDatasetsRequest())).datasets) == []


# -- streaming --------------------------------------------------------------------------


async def test_stream_delivers_each_example_of_the_split_once_with_matching_tensors(
    server: Server,
) -> None:
    created = await upload(server, 100)
    data = columns(100)
    batches = await collect(server, split=pb.SPLIT_TRAIN, batch_size=16, shuffle=True, seed=9)
    assert [b.index for b in batches] == list(range(len(batches)))
    ids = [i for b in batches for i in b.example_ids]
    assert len(ids) == len(set(ids)) == created.num_train
    for batch in batches:
        arrays = wire.arrays_from_batch(batch)
        assert [t.name for t in batch.tensors] == ["x", "y"]
        assert arrays["x"].dtype == np.float32 and arrays["y"].dtype == np.int64
        assert np.array_equal(arrays["x"], data["x"][list(batch.example_ids)])
        assert np.array_equal(arrays["y"], data["y"][list(batch.example_ids)])
    splits = {
        split: {i for b in await collect(server, split=split, batch_size=50) for i in b.example_ids}
        for split in (pb.SPLIT_TRAIN, pb.SPLIT_VALIDATION, pb.SPLIT_TEST)
    }
    assert set().union(*splits.values()) == set(range(100))
    assert sum(len(s) for s in splits.values()) == 100


async def test_same_seed_and_epoch_same_order_other_epoch_other_order(server: Server) -> None:
    await upload(server, 100)

    async def order(**fields: object) -> list[int]:
        batches = await collect(server, split=pb.SPLIT_ALL, batch_size=8, shuffle=True, **fields)
        return [i for b in batches for i in b.example_ids]

    first = await order(seed=1, epoch=0)
    assert first == await order(seed=1, epoch=0)
    assert first != await order(seed=1, epoch=1)
    assert sorted(first) == sorted(await order(seed=1, epoch=1)) == list(range(100))


async def test_shards_partition_the_epoch(server: Server) -> None:
    await upload(server, 100)
    shards = [
        [
            i
            for b in await collect(
                server, split=pb.SPLIT_ALL, batch_size=7, shuffle=True, num_shards=3, shard_index=k
            )
            for i in b.example_ids
        ]
        for k in range(3)
    ]
    assert sorted(i for shard in shards for i in shard) == list(range(100))
    assert sorted(len(s) for s in shards) == [33, 33, 34]


async def test_drop_last_and_standardize(server: Server) -> None:
    created = await upload(server, 100)
    batches = await collect(
        server, split=pb.SPLIT_TRAIN, batch_size=16, drop_last=True, standardize=True
    )
    assert [b.size for b in batches] == [16] * (created.num_train // 16)
    full = await collect(server, split=pb.SPLIT_TRAIN, batch_size=1000, standardize=True)
    x = wire.arrays_from_batch(full[0])["x"]
    assert x.dtype == np.float32
    assert np.allclose(x.mean(axis=0), 0.0, atol=1e-5)
    assert np.allclose(x.std(axis=0), 1.0, atol=1e-5)
    y = wire.arrays_from_batch(full[0])["y"]
    assert y.dtype == np.int64  # labels are left alone


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        (
            {"split": pb.SPLIT_TRAIN, "batch_size": 0},
            "INVALID_ARGUMENT",
            "batch_size must be positive",
        ),
        (
            {"split": pb.SPLIT_TRAIN, "batch_size": -1},
            "INVALID_ARGUMENT",
            "batch_size must be positive",
        ),
        ({"batch_size": 8}, "INVALID_ARGUMENT", "split must be SPLIT_TRAIN"),
        ({"split": 42, "batch_size": 8}, "INVALID_ARGUMENT", "got 42"),
        (
            {"split": pb.SPLIT_TRAIN, "batch_size": 8, "num_shards": 2, "shard_index": 5},
            "INVALID_ARGUMENT",
            "shard_index must be in [0, 2)",
        ),
        ({"split": pb.SPLIT_TRAIN, "batch_size": 8, "version": "9"}, "NOT_FOUND", "no version '9'"),
        (
            {"dataset": "nope", "split": pb.SPLIT_TRAIN, "batch_size": 8},
            "NOT_FOUND",
            "'nope' not found",
        ),
    ],
)
async def test_stream_errors(
    server: Server, fields: dict[str, object], code: str, message: str
) -> None:
    await upload(server, 20)
    request = pb.StreamBatchesRequest(**{"dataset": "toy", **fields})  # type: ignore[arg-type]
    status, details = await status_of(server.stub.StreamBatches(request))
    assert status == grpc.StatusCode[code]
    assert message in details


async def test_corrupted_chunk_on_disk_is_data_loss(server: Server) -> None:
    await upload(server, 100)
    info = server.store.get("toy")
    victim = Path(chunk_paths(server.store, info)[-1])
    victim.write_bytes(b"\0" * victim.stat().st_size)
    status, details = await status_of(
        server.stub.StreamBatches(
            pb.StreamBatchesRequest(dataset="toy", split=pb.SPLIT_ALL, batch_size=100)
        )
    )
    assert status == grpc.StatusCode.DATA_LOSS
    assert f"chunk file toy/1/{victim.name} is corrupt" in details
    assert str(server.root) not in details  # the server's paths stay private


# -- the parts every server has -------------------------------------------------------------


async def test_health_and_reflection_list_the_data_service(server: Server) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    call = server.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)

    responses = [r async for r in call(ask())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto


# -- the client command line ----------------------------------------------------------------


async def test_datasets_cli_creates_uploads_lists_and_streams(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    address = server.serving.address
    npz = tmp_path / "d.npz"
    data = columns(40)
    np.savez(npz, x=data["x"], y=data["y"])

    async def cli(*argv: str) -> int:
        return await asyncio.to_thread(main, ["datasets", "--address", address, *argv])

    assert await cli("create", "blobs", "--source", "blobs", "--num-examples", "64") == 0
    assert (
        await cli(
            "upload",
            "toy",
            str(npz),
            "--features",
            "x",
            "--labels",
            "y",
            "--task",
            "classification",
            "--num-classes",
            "4",
        )
        == 0
    )
    assert await cli("list") == 0
    listing = capsys.readouterr().out
    assert "blobs" in listing and "toy" in listing
    assert await cli("stream", "toy", "--split", "all", "--batch-size", "10") == 0
    assert "4 batches, 40 examples" in capsys.readouterr().out
    uploaded = await server.stub.GetDataset(pb.GetDatasetRequest(name="toy"))
    assert uploaded.num_examples == 40 and uploaded.schema.num_classes == 4
    assert await cli("get", "nope") == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert await cli("delete", "toy", "--version", "1") == 0
    assert [
        d.name for d in (await server.stub.ListDatasets(pb.ListDatasetsRequest())).datasets
    ] == ["blobs"]


async def test_batch_over_the_message_limit_is_refused_before_streaming(tmp_path: Path) -> None:
    limit = 64 * 1024
    store = DatasetStore(str(tmp_path / "data"))
    settings = ServerSettings(max_message_bytes=limit)
    async with serve([data_service(store, limit)], settings) as (_, channel):
        stub = data_pb2_grpc.DataServiceStub(channel)
        source = pb.RegressionSource(num_examples=200, num_features=256)  # 1 KiB per example
        await stub.CreateBuiltinDataset(
            pb.CreateBuiltinDatasetRequest(name="wide", regression=source)
        )

        def request(batch_size: int) -> pb.StreamBatchesRequest:
            return pb.StreamBatchesRequest(
                dataset="wide", split=pb.SPLIT_ALL, batch_size=batch_size
            )

        code, details = await status_of(stub.StreamBatches(request(100)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "use a smaller batch_size" in details
        assert sum([b.size async for b in stub.StreamBatches(request(50))]) == 200


async def test_concurrent_uploads_without_version_get_distinct_versions(server: Server) -> None:
    created = await asyncio.gather(*(upload(server, 30) for _ in range(4)))
    assert sorted(int(d.version) for d in created) == [1, 2, 3, 4]
    listed = await server.stub.ListDatasets(pb.ListDatasetsRequest(name="toy"))
    assert len(listed.datasets) == 4
