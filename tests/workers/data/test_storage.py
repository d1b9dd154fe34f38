"""The dataset store: atomic commits, versions, bounded chunks, checksums, clean failures."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mesh.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound
from tests.workers.data.conftest import CHUNK_BYTES, columns, committed_files
from workers.data.schema import DType, Schema, Task, TensorSpec
from workers.data.splits import SplitSpec, partition
from workers.data.storage import STAGING, DatasetStore, UploadHeader, chunk_paths

SCHEMA = Schema(
    (TensorSpec("x", DType.FP32, (3,)),),
    (TensorSpec("y", DType.INT64, ()),),
    Task.CLASSIFICATION,
    4,
)


def upload(name: str = "toy", version: str = "", split: SplitSpec | None = None) -> UploadHeader:
    return UploadHeader(name, version, SCHEMA, split or SplitSpec.of(0.2, 0.1, 5))


class Clock:
    """A clock that moves one second per reading, so creation times are distinct."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def test_commit_writes_bounded_chunks_and_a_manifest(store: DatasetStore) -> None:
    data = columns(100)
    info = store.create(upload(), data)
    assert (info.name, info.version, info.num_examples) == ("toy", "1", 100)
    assert (info.num_train, info.num_validation, info.num_test) == (70, 20, 10)
    assert len(info.chunks) > 1
    # 20 bytes per example, 256-byte chunk target: 12 records per chunk.
    assert all(c.size_bytes <= CHUNK_BYTES for c in info.chunks)
    assert sum(c.num_records for c in info.chunks) == 100
    paths = chunk_paths(store, info)
    assert all(
        Path(p).stat().st_size == c.size_bytes for p, c in zip(paths, info.chunks, strict=True)
    )
    assert store.get("toy") == info == store.get("toy", "1")


def test_examples_read_back_in_any_order(store: DatasetStore) -> None:
    data = columns(100)
    info = store.create(upload(), data)
    ids = np.array([99, 0, 57, 13, 13, 42], dtype=np.int64)
    got = store.read_examples(info, ids)
    assert np.array_equal(got["x"], data["x"][ids])
    assert np.array_equal(got["y"], data["y"][ids])


def test_training_statistics_cover_only_the_training_split(store: DatasetStore) -> None:
    data = columns(100)
    info = store.create(upload(), data)
    train = partition(100, info.split).train
    stats = info.stats_for("x")
    assert np.allclose(stats.mean, data["x"][train].astype(np.float64).mean(axis=0))
    assert np.allclose(stats.std, data["x"][train].astype(np.float64).std(axis=0))
    standardized = store.read_examples(info, train, standardized=True)["x"]
    assert np.allclose(standardized.mean(axis=0), 0.0, atol=1e-5)
    assert np.allclose(standardized.std(axis=0), 1.0, atol=1e-5)


def test_versions_count_up_and_named_versions_coexist(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path), clock=Clock())
    assert store.create(upload(), columns(5)).version == "1"
    assert store.create(upload(version="golden"), columns(5)).version == "golden"
    assert store.create(upload(), columns(6)).version == "2"
    assert store.get("toy").version == "2"  # the latest is the most recently created
    listed = [(i.name, i.version) for i in store.list()]
    assert listed == [("toy", "1"), ("toy", "golden"), ("toy", "2")]


def test_duplicate_version_is_already_exists_and_changes_nothing(store: DatasetStore) -> None:
    first = store.create(upload(version="v1"), columns(10))
    with pytest.raises(AlreadyExists, match="'toy' version 'v1' already exists"):
        store.create(upload(version="v1"), columns(20))
    assert store.get("toy", "v1") == first
    assert not list((Path(store.root) / STAGING).iterdir())


def test_delete_removes_the_version_and_its_files(store: DatasetStore) -> None:
    store.create(upload(), columns(10))
    store.create(upload(name="other"), columns(10))
    store.delete("toy", "1")
    with pytest.raises(NotFound):
        store.get("toy")
    assert [i.name for i in store.list()] == ["other"]
    assert not (Path(store.root) / "toy").exists()
    with pytest.raises(NotFound, match="'toy' has no version '1'"):
        store.delete("toy", "1")
    with pytest.raises(InvalidArgument, match="version is required"):
        store.delete("other", "")


def test_corrupted_chunk_is_data_loss_naming_the_file(store: DatasetStore) -> None:
    info = store.create(upload(), columns(50))
    victim = Path(chunk_paths(store, info)[1])
    raw = bytearray(victim.read_bytes())
    raw[3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    first_chunk = np.arange(info.chunks[0].num_records, dtype=np.int64)
    assert len(store.read_examples(info, first_chunk)["x"]) == len(first_chunk)
    with pytest.raises(DataLoss, match=rf"^chunk file toy/1/{victim.name} is corrupt"):
        store.read_examples(info, np.arange(50, dtype=np.int64))


def test_missing_chunk_and_corrupt_manifest_are_data_loss(store: DatasetStore) -> None:
    info = store.create(upload(), columns(50))
    Path(chunk_paths(store, info)[0]).unlink()
    with pytest.raises(DataLoss, match="is missing"):
        store.read_examples(info, np.arange(3, dtype=np.int64))
    manifest = Path(store.root) / "toy" / "1" / "manifest.json"
    body = json.loads(manifest.read_text())
    del body["chunks"]
    manifest.write_text(json.dumps(body))
    with pytest.raises(DataLoss, match=r"^manifest toy/1/manifest.json is corrupt"):
        store.get("toy", "1")


def test_aborted_upload_leaves_no_trace(store: DatasetStore) -> None:
    writer = store.begin(upload())
    writer.append(columns(100))  # several chunk files are staged by now
    assert committed_files(Path(store.root))
    writer.abort()
    assert committed_files(Path(store.root)) == []
    assert store.list() == []


def test_empty_upload_is_rejected_and_leaves_nothing(store: DatasetStore) -> None:
    writer = store.begin(upload())
    with pytest.raises(InvalidArgument, match="has no records"):
        writer.commit()
    writer.abort()
    assert committed_files(Path(store.root)) == []


def test_opening_a_store_removes_staging_left_by_a_crash(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path), chunk_bytes=CHUNK_BYTES)
    writer = store.begin(upload())
    writer.append(columns(100))  # chunk files staged; then the process "dies"
    assert committed_files(tmp_path)
    reopened = DatasetStore(str(tmp_path))
    assert committed_files(tmp_path) == []
    assert reopened.list() == []


def test_version_without_manifest_is_invisible_and_overwritten(store: DatasetStore) -> None:
    # What a crash between moving chunks and writing the manifest leaves behind.
    half = Path(store.root) / "toy" / "1"
    half.mkdir(parents=True)
    (half / "chunk-000000.bin").write_bytes(b"junk")
    assert store.list() == []
    with pytest.raises(NotFound):
        store.get("toy")
    info = store.create(upload(), columns(10))
    assert info.version == "1"
    assert len(store.read_examples(info, np.arange(10, dtype=np.int64))["y"]) == 10


def test_bad_names_are_rejected_before_anything_is_written(store: DatasetStore) -> None:
    for header, message in (
        (upload(name=""), "dataset name must not be empty"),
        (upload(version="a/b"), "version 'a/b' is invalid"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            store.begin(header)
    assert committed_files(Path(store.root)) == []


def test_store_works_on_another_fsspec_filesystem() -> None:
    # fsspec's in-memory filesystem stands in for an object store: no directory
    # renames, only file moves, so visibility rests on the manifest alone.
    store = DatasetStore(f"memory://datasets-{uuid.uuid4().hex}", chunk_bytes=CHUNK_BYTES)
    data = columns(40)
    info = store.create(upload(), data)
    assert len(info.chunks) > 1 and store.get("toy") == info
    ids = np.arange(40, dtype=np.int64)[::-1].copy()
    assert np.array_equal(store.read_examples(info, ids)["x"], data["x"][ids])
    store.delete("toy", "1")
    assert store.list() == []
    assert not store.fs.ls(store.staging_root(), detail=False)
