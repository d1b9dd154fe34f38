"""Datasets on an fsspec filesystem: chunk files plus a manifest committed last.

Layout under the root URL (a local directory by default)::

    <root>/<name>/<version>/manifest.json       committed metadata (see manifest.py)
    <root>/<name>/<version>/chunk-000000.bin    records, every column back to back
    <root>/.staging/<upload-id>/                an upload in progress

A version exists exactly when its manifest exists. An upload writes its chunks
under ``.staging``, reads them back to verify them and compute the training
statistics, moves them into the version directory and writes the manifest last
(temporary name, then rename), so a reader never sees part of a version. A
failed or cancelled upload deletes its staging directory; staging left by a
crash is removed when the store opens. One data worker owns a root: commits are
serialised by a lock in this process, not across processes.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import posixpath
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec
import numpy as np

from mesh.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound
from workers.data import manifest
from workers.data.manifest import MANIFEST_FILE, ChunkInfo, DatasetInfo
from workers.data.schema import Array, Schema, validate_name, validate_schema
from workers.data.splits import Indices, SplitSpec, partition
from workers.data.standardize import RunningStats, standardize

log = logging.getLogger(__name__)

STAGING = ".staging"
#: Chunk files hold about this many bytes (at least one record).
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
#: Verified chunks kept decoded in memory for streaming.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class UploadHeader:
    """What an upload declares before its records."""

    name: str
    version: str
    schema: Schema
    split: SplitSpec
    description: str = ""
    source: str = "upload"


def _version_key(version: str) -> tuple[int, int, str]:
    # Integer versions sort numerically and before named ones.
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


class DatasetStore:
    """Creates, lists, reads and deletes dataset versions under one root URL."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = utc_now,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.url = url
        fs, path = fsspec.core.url_to_fs(url)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = str(path).rstrip("/") or "/"
        self.clock = clock
        self.chunk_bytes = chunk_bytes
        self._commit_lock = threading.Lock()
        self._cache = _ChunkCache(cache_bytes)
        self.fs.makedirs(self.root, exist_ok=True)
        self._remove_stale_staging()

    # -- paths -----------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def shown(self, path: str) -> str:
        """``path`` relative to the root, as errors show it: it names the file
        without telling clients where the server keeps its data."""
        return posixpath.relpath(path, self.root)

    def staging_root(self) -> str:
        return self.path(STAGING)

    def _remove_stale_staging(self) -> None:
        staging = self.staging_root()
        if self.fs.exists(staging):
            for entry in self.fs.ls(staging, detail=False):
                log.warning("removing staging left by an interrupted upload: %s", entry)
                self.fs.rm(entry, recursive=True)

    # -- reading metadata ----------------------------------------------------------

    def _names(self) -> list[str]:
        names = []
        for entry in self.fs.ls(self.root, detail=True):
            name = posixpath.basename(str(entry["name"]).rstrip("/"))
            if entry["type"] == "directory" and not name.startswith("."):
                names.append(name)
        return sorted(names)

    def _versions(self, name: str) -> list[str]:
        """Committed versions of ``name`` (those with a manifest), oldest label first."""
        directory = self.path(name)
        if not self.fs.isdir(directory):
            return []
        versions = []
        for entry in self.fs.ls(directory, detail=False):
            version = posixpath.basename(str(entry).rstrip("/"))
            if not version.startswith(".") and self.fs.exists(
                posixpath.join(str(entry), MANIFEST_FILE)
            ):
                versions.append(version)
        return sorted(versions, key=_version_key)

    def _read_manifest(self, name: str, version: str) -> DatasetInfo:
        path = self.path(name, version, MANIFEST_FILE)
        try:
            text = self.fs.cat_file(path).decode()
        except FileNotFoundError as exc:
            raise NotFound(f"dataset {name!r} has no version {version!r}") from exc
        except UnicodeDecodeError as exc:
            raise DataLoss(f"manifest {self.shown(path)} is corrupt: {exc}") from exc
        return manifest.from_json(text, self.shown(path))

    def get(self, name: str, version: str = "") -> DatasetInfo:
        """One version; an empty version means the latest (newest creation time)."""
        validate_name(name)
        if version:
            validate_name(version, "version")
            return self._read_manifest(name, version)
        infos = [self._read_manifest(name, v) for v in self._versions(name)]
        if not infos:
            raise NotFound(f"dataset {name!r} not found")
        return max(infos, key=lambda i: (i.created_at, _version_key(i.version)))

    def list(self, name: str = "") -> list[DatasetInfo]:
        """Datasets sorted by name, then creation time (newest version of each name last)."""
        names = [validate_name(name)] if name else self._names()
        infos = [self._read_manifest(n, v) for n in names for v in self._versions(n)]
        return sorted(infos, key=lambda i: (i.name, i.created_at, _version_key(i.version)))

    def delete(self, name: str, version: str) -> None:
        """Removes one version: the manifest first, so it vanishes at once."""
        validate_name(name)
        if not version:
            raise InvalidArgument("version is required to delete a dataset")
        validate_name(version, "version")
        with self._commit_lock:
            path = self.path(name, version)
            manifest_path = posixpath.join(path, MANIFEST_FILE)
            if not self.fs.exists(manifest_path):
                raise NotFound(f"dataset {name!r} has no version {version!r}")
            self.fs.rm(manifest_path)
            self.fs.rm(path, recursive=True)
            name_dir = self.path(name)
            if not self.fs.ls(name_dir, detail=False):
                self.fs.rmdir(name_dir)

    # -- writing ---------------------------------------------------------------------

    def begin(self, header: UploadHeader) -> DatasetWriter:
        """Starts an upload; fails fast if an explicit version is taken."""
        self.ensure_free(header.name, header.version)
        validate_schema(header.schema)
        return DatasetWriter(self, header)

    def create(self, header: UploadHeader, columns: Mapping[str, Array]) -> DatasetInfo:
        """Writes a whole in-memory dataset (e.g. a built-in one) as one upload."""
        writer = self.begin(header)
        try:
            writer.append(columns)
            return writer.commit()
        finally:
            writer.abort()

    def ensure_free(self, name: str, version: str) -> None:
        """Validates the name and version; AlreadyExists if that version is committed."""
        validate_name(name)
        if not version:
            return
        validate_name(version, "version")
        if self.fs.exists(self.path(name, version, MANIFEST_FILE)):
            raise AlreadyExists(f"dataset {name!r} version {version!r} already exists")

    def _next_version(self, name: str) -> str:
        numbers = [int(v) for v in self._versions(name) if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    def publish(
        self, header: UploadHeader, staging: str, build: Callable[[str], DatasetInfo]
    ) -> DatasetInfo:
        """Moves staged chunks into place and commits the manifest, under the lock."""
        with self._commit_lock:
            version = header.version or self._next_version(header.name)
            self.ensure_free(header.name, version)
            info = build(version)
            target = self.path(header.name, version)
            if self.fs.exists(target):
                # A directory without a manifest is what a crash mid-commit leaves.
                self.fs.rm(target, recursive=True)
            self.fs.makedirs(target, exist_ok=True)
            for chunk in info.chunks:
                self.fs.mv(posixpath.join(staging, chunk.file), posixpath.join(target, chunk.file))
            tmp = posixpath.join(target, f".{MANIFEST_FILE}.{uuid.uuid4().hex}.tmp")
            self.fs.pipe_file(tmp, manifest.to_json(info).encode())
            self.fs.mv(tmp, posixpath.join(target, MANIFEST_FILE))
            return info

    # -- reading records -------------------------------------------------------------

    def read_verified(self, path: str, chunk: ChunkInfo) -> bytes:
        """A chunk file's bytes, verified against its checksum."""
        try:
            data: bytes = self.fs.cat_file(path)
        except FileNotFoundError as exc:
            raise DataLoss(f"chunk file {self.shown(path)} is missing") from exc
        if len(data) != chunk.size_bytes or hashlib.sha256(data).hexdigest() != chunk.sha256:
            raise DataLoss(
                f"chunk file {self.shown(path)} is corrupt: its sha256 does not match the manifest"
            )
        return data

    def _chunk(self, info: DatasetInfo, index: int) -> dict[str, Array]:
        chunk = info.chunks[index]
        path = self.path(info.name, info.version, chunk.file)
        key = (path, chunk.sha256)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        columns = split_columns(info.schema, self.read_verified(path, chunk), chunk.num_records)
        self._cache.put(key, columns, chunk.size_bytes)
        return columns

    def read_examples(
        self, info: DatasetInfo, ids: Indices, *, standardized: bool = False
    ) -> dict[str, Array]:
        """The examples at positions ``ids`` (stored order), in the order given.

        Reads only the chunk files those positions fall in. With ``standardized``,
        feature columns are standardised with the training statistics.
        """
        starts = np.cumsum([0, *(c.num_records for c in info.chunks)])
        which = np.searchsorted(starts, ids, side="right") - 1
        out: dict[str, Array] = {
            spec.name: np.empty((len(ids), *spec.shape), dtype=spec.dtype.numpy)
            for spec in info.schema.columns
        }
        for chunk_index in np.unique(which):
            mask = which == chunk_index
            rows = ids[mask] - starts[chunk_index]
            columns = self._chunk(info, int(chunk_index))
            for name, array in out.items():
                array[mask] = columns[name][rows]
        if standardized:
            for spec in info.schema.features:
                out[spec.name] = standardize(out[spec.name], spec, info.stats_for(spec.name))
        return out

    def read_batches(
        self, info: DatasetInfo, batches: Sequence[Indices], *, standardized: bool = False
    ) -> Sequence[dict[str, Array]]:
        """Several batches in one pass: each chunk file they touch is read once."""
        if not batches:
            return []
        everything = self.read_examples(info, np.concatenate(batches), standardized=standardized)
        bounds = np.cumsum([0, *(len(b) for b in batches)])
        return [
            {name: array[lo:hi] for name, array in everything.items()}
            for lo, hi in itertools.pairwise(bounds)
        ]


def split_columns(schema: Schema, data: bytes, num_records: int) -> dict[str, Array]:
    """Decodes a chunk file's bytes into one read-only array per column."""
    columns: dict[str, Array] = {}
    offset = 0
    for spec in schema.columns:
        size = num_records * spec.example_bytes
        columns[spec.name] = np.frombuffer(
            data, dtype=spec.dtype.numpy, count=num_records * spec.elements, offset=offset
        ).reshape((num_records, *spec.shape))
        offset += size
    if offset != len(data):
        raise DataLoss(f"chunk of {len(data)} bytes does not hold {num_records} records")
    return columns


class DatasetWriter:
    """One upload in progress: buffers records, writes bounded chunk files, commits."""

    def __init__(self, store: DatasetStore, header: UploadHeader) -> None:
        self.store = store
        self.header = header
        self.schema = header.schema
        self.staging = posixpath.join(store.staging_root(), uuid.uuid4().hex)
        self._rows_per_chunk = max(1, store.chunk_bytes // max(1, self.schema.example_bytes))
        self._pending: list[dict[str, Array]] = []
        self._pending_rows = 0
        self._chunks: list[ChunkInfo] = []
        self.num_records = 0
        self._closed = False
        # The servicer may abort (client cancelled) while an append or commit
        # still runs in a worker thread: abort waits for it instead of racing it.
        self._lock = threading.RLock()
        store.fs.makedirs(self.staging, exist_ok=True)

    def append(self, columns: Mapping[str, Array]) -> None:
        """Adds records: one array per schema column, equal leading dimensions."""
        with self._lock:
            self._append(columns)

    def _append(self, columns: Mapping[str, Array]) -> None:
        if self._closed:
            raise RuntimeError("upload already finished")
        lengths = {int(columns[spec.name].shape[0]) for spec in self.schema.columns}
        if len(lengths) != 1:
            raise InvalidArgument(f"columns have different numbers of records: {sorted(lengths)}")
        n = lengths.pop()
        if n == 0:
            return
        self._pending.append(
            {s.name: np.asarray(columns[s.name], dtype=s.dtype.numpy) for s in self.schema.columns}
        )
        self._pending_rows += n
        self.num_records += n
        if self._pending_rows >= self._rows_per_chunk:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self._pending:
            return
        merged = {
            s.name: np.concatenate([p[s.name] for p in self._pending]) for s in self.schema.columns
        }
        total = self._pending_rows
        start = 0
        while total - start >= self._rows_per_chunk or (final and start < total):
            stop = min(start + self._rows_per_chunk, total)
            self._write_chunk({name: a[start:stop] for name, a in merged.items()}, stop - start)
            start = stop
        rest = {name: a[start:] for name, a in merged.items()}
        self._pending = [rest] if start < total else []
        self._pending_rows = total - start

    def _write_chunk(self, columns: Mapping[str, Array], n: int) -> None:
        data = b"".join(
            np.ascontiguousarray(columns[s.name]).tobytes() for s in self.schema.columns
        )
        name = f"chunk-{len(self._chunks):06d}.bin"
        self.store.fs.pipe_file(posixpath.join(self.staging, name), data)
        self._chunks.append(ChunkInfo(name, n, len(data), hashlib.sha256(data).hexdigest()))

    def commit(self) -> DatasetInfo:
        """Verifies the staged chunks, computes statistics and publishes the version."""
        with self._lock:
            return self._commit()

    def _commit(self) -> DatasetInfo:
        if self._closed:
            raise RuntimeError("upload already finished")
        self._flush(final=True)
        if self.num_records == 0:
            raise InvalidArgument(f"dataset {self.header.name!r} has no records")
        parts = partition(self.num_records, self.header.split)
        stats = [RunningStats(spec) for spec in self.schema.features]
        digest = hashlib.sha256()
        first = 0
        for chunk in self._chunks:
            # Read back what was written: the checksum in the manifest must
            # describe the bytes on storage, not the bytes we meant to write.
            data = self.store.read_verified(posixpath.join(self.staging, chunk.file), chunk)
            digest.update(data)
            columns = split_columns(self.schema, data, chunk.num_records)
            lo, hi = np.searchsorted(parts.train, [first, first + chunk.num_records])
            rows = parts.train[lo:hi] - first
            for running in stats:
                running.update(columns[running.spec.name][rows])
            first += chunk.num_records
        header = self.header

        def build(version: str) -> DatasetInfo:
            return DatasetInfo(
                name=header.name,
                version=version,
                schema=self.schema,
                num_examples=self.num_records,
                num_train=len(parts.train),
                num_validation=len(parts.validation),
                num_test=len(parts.test),
                sha256=digest.hexdigest(),
                created_at=self.store.clock(),
                size_bytes=sum(c.size_bytes for c in self._chunks),
                description=header.description,
                source=header.source,
                feature_stats=tuple(s.result() for s in stats),
                split=header.split,
                chunks=tuple(self._chunks),
            )

        info = self.store.publish(header, self.staging, build)
        self.abort()
        return info

    def abort(self) -> None:
        """Deletes the staging directory; safe to call more than once."""
        with self._lock:
            self._closed = True
            self._pending = []
            if self.store.fs.exists(self.staging):
                self.store.fs.rm(self.staging, recursive=True)


class _ChunkCache:
    """A byte-bounded LRU of decoded chunks, shared by the threads that stream."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], tuple[dict[str, Array], int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> dict[str, Array] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: tuple[str, str], value: dict[str, Array], size: int) -> None:
        if size > self.capacity:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, size)
            self._size += size
            while self._size > self.capacity:
                _, (_, evicted) = self._items.popitem(last=False)
                self._size -= evicted


def chunk_paths(store: DatasetStore, info: DatasetInfo) -> Sequence[str]:
    """Where a version's chunk files live (for tools and tests)."""
    return [store.path(info.name, info.version, c.file) for c in info.chunks]
