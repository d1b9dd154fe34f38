"""Triton's system shared-memory extension: regions of /dev/shm that requests read and write.

A client on the worker's host puts an input tensor in a POSIX shared-memory object,
registers the span as a named region, and names the region in the request instead of
sending the bytes; an output that names a region is written there instead of into
``raw_output_contents``. The parameters are Triton's: ``shared_memory_region``,
``shared_memory_byte_size`` and ``shared_memory_offset`` on an input or a requested
output.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from protos.inference import grpc_service_pb2 as pb

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
_PARAMETERS = (REGION, BYTE_SIZE, OFFSET)

#: Where POSIX shm_open objects live on Linux: key "/name" is the file /dev/shm/name.
SHM_ROOT = "/dev/shm"
#: Each region holds a file descriptor and a mapping; a client that never unregisters
#: must not exhaust the worker's descriptors.
MAX_REGIONS = 1024


@dataclass(frozen=True)
class RegionStatus:
    """A registered region as SystemSharedMemoryStatus reports it."""

    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    """One registered span of a shared-memory object, mapped into this process."""

    def __init__(self, status: RegionStatus, fd: int, mapped: mmap.mmap, start: int) -> None:
        self.status = status
        self._fd = fd
        self._mapped = mapped
        #: Where the region begins inside the mapping (mmap offsets are page-aligned).
        self._start = start
        self._lock = threading.Lock()
        self._closed = False

    def _span(self, offset: int, size: int, what: str) -> tuple[int, int]:
        status = self.status
        if offset < 0 or size < 0 or offset + size > status.byte_size:
            raise InvalidArgument(
                f"{what}: {size} bytes at offset {offset} do not fit in shared memory region "
                f"{status.name!r} ({status.byte_size} bytes)"
            )
        # A client that shrinks its object after registering would make the next access
        # a SIGBUS that kills the worker; the file's current size is checked first.
        if os.fstat(self._fd).st_size < status.offset + offset + size:
            raise FailedPrecondition(
                f"{what}: shared memory key {status.key!r} of region {status.name!r} was "
                "truncated below the registered size"
            )
        begin = self._start + offset
        return begin, begin + size

    def read(self, offset: int, size: int, what: str) -> bytes:
        with self._lock:
            self._check_open(what)
            begin, end = self._span(offset, size, what)
            return self._mapped[begin:end]

    def write(self, offset: int, data: bytes, what: str) -> None:
        with self._lock:
            self._check_open(what)
            begin, end = self._span(offset, len(data), what)
            self._mapped[begin:end] = data

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise FailedPrecondition(
                f"{what}: shared memory region {self.status.name!r} was unregistered "
                "during the request"
            )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._mapped.close()
            os.close(self._fd)


def _path_of(key: str, root: str) -> str:
    """The file behind an shm_open key ("/name" or "name"); refuses keys that leave ``root``."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise InvalidArgument(
            f"shared memory key {key!r} is not a POSIX shared memory name "
            "(expected '/name' without further slashes)"
        )
    return os.path.join(root, name)


class SharedMemoryRegistry:
    """The regions registered with one worker, by name. Thread-safe."""

    def __init__(self, root: str = SHM_ROOT, max_regions: int = MAX_REGIONS) -> None:
        self.root = root
        self.max_regions = max_regions
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidArgument("a shared memory region needs a name")
        if byte_size <= 0:
            raise InvalidArgument(f"shared memory region {name!r}: byte_size must be > 0")
        path = _path_of(key, self.root)
        with self._lock:
            if name in self._regions:
                # As Triton: a name is registered once; unregister it to change it.
                raise AlreadyExists(f"shared memory region {name!r} is already registered")
            if len(self._regions) >= self.max_regions:
                raise ResourceExhausted(
                    f"{self.max_regions} shared memory regions are registered; unregister some"
                )
            self._regions[name] = self._map(name, key, path, offset, byte_size)

    def _map(self, name: str, key: str, path: str, offset: int, byte_size: int) -> _Region:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(
                f"shared memory region {name!r}: key {key!r} does not exist on this host"
            ) from None
        except OSError as exc:
            raise FailedPrecondition(
                f"shared memory region {name!r}: cannot open key {key!r}: {exc.strerror}"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidArgument(
                    f"shared memory region {name!r}: {byte_size} bytes at offset {offset} "
                    f"exceed key {key!r} ({size} bytes)"
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(fd, offset + byte_size - start, offset=start)
        except BaseException:
            os.close(fd)
            raise
        return _Region(RegionStatus(name, key, offset, byte_size), fd, mapped, offset - start)

    def status(self, name: str = "") -> list[RegionStatus]:
        """Every region, or the one named (NOT_FOUND if it is not registered, as Triton)."""
        with self._lock:
            if not name:
                return [r.status for r in self._regions.values()]
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"shared memory region {name!r} is not registered")
        return [region.status]

    def unregister(self, name: str = "") -> None:
        """Drops one region, or all of them when ``name`` is empty; an unknown name is a no-op.

        Idempotent as Triton's: a client cleaning up twice, or a gateway fanning the call
        out to workers that never saw the region, must not fail.
        """
        with self._lock:
            if name:
                dropped = [r for r in (self._regions.pop(name, None),) if r is not None]
            else:
                dropped, self._regions = list(self._regions.values()), {}
        for region in dropped:
            region.close()

    def close(self) -> None:
        self.unregister()

    def _region(self, name: str, what: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise FailedPrecondition(
                f"{what}: shared memory region {name!r} is not registered on this worker"
            )
        return region

    def plan(self, request: pb.ModelInferRequest) -> SharedRequest | None:
        """``request`` with its shared-memory inputs read in, and where its outputs go.

        None when the request names no region: the common path pays one look at each
        tensor's (usually empty) parameters.
        """
        if not _has_parameters(request):
            return None
        inputs = {t.name: _target(t.name, "input", t.parameters) for t in request.inputs}
        outputs = {o.name: _target(o.name, "output", o.parameters) for o in request.outputs}
        if not any(inputs.values()) and not any(outputs.values()):
            return None
        for name, target in outputs.items():
            if target is not None:
                what = f"output {name!r}"
                # Fails before the model runs: an unknown region or a span off its end.
                self._region(target.region, what)._span(target.offset, target.byte_size, what)
        shared_outputs = {n: t for n, t in outputs.items() if t is not None}
        if not any(inputs.values()):
            return SharedRequest(self, request, shared_outputs)
        return SharedRequest(self, self._read_inputs(request, inputs), shared_outputs)

    def _read_inputs(
        self, request: pb.ModelInferRequest, targets: Mapping[str, Target | None]
    ) -> pb.ModelInferRequest:
        """A copy of ``request`` whose every input is in raw_input_contents, in order."""
        raws = list(request.raw_input_contents)
        plain = sum(1 for t in targets.values() if t is None)
        if raws and len(raws) != plain:
            raise InvalidArgument(
                f"request has {len(raws)} raw_input_contents for {plain} inputs not in "
                "shared memory; raw contents must be given for every such input or none"
            )
        rewritten = pb.ModelInferRequest()
        rewritten.CopyFrom(request)
        del rewritten.raw_input_contents[:]
        remaining = iter(raws)
        for tensor in rewritten.inputs:
            target = targets[tensor.name]
            what = f"input {tensor.name!r}"
            if target is None:
                if not raws:
                    # decode_inputs takes raw contents for all inputs or none.
                    raise InvalidArgument(
                        f"{what}: send it in raw_input_contents when another input is in "
                        "shared memory"
                    )
                rewritten.raw_input_contents.append(next(remaining))
                continue
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise InvalidArgument(f"{what}: has contents and a shared memory region")
            data = self._region(target.region, what).read(target.offset, target.byte_size, what)
            rewritten.raw_input_contents.append(data)
            for key in _PARAMETERS:
                if key in tensor.parameters:
                    del tensor.parameters[key]
        return rewritten


def _has_parameters(request: pb.ModelInferRequest) -> bool:
    # Runs for every request: a look at each tensor's parameter map, usually empty.
    return any(t.parameters for t in request.inputs) or any(o.parameters for o in request.outputs)


@dataclass(frozen=True)
class Target:
    """Where one tensor lives: a region, an offset into it, and a size."""

    region: str
    offset: int
    byte_size: int


def _target(name: str, kind: str, parameters: Mapping[str, pb.InferParameter]) -> Target | None:
    """The tensor's shared-memory parameters, checked as Triton checks them; None if absent."""
    if REGION not in parameters:
        stray = [p for p in (BYTE_SIZE, OFFSET) if p in parameters]
        if stray:
            raise InvalidArgument(
                f"{kind} {name!r}: {stray[0]!r} can not be specified without {REGION!r}"
            )
        return None
    region = parameters[REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"{kind} {name!r}: {REGION!r} must be a string_param")
    if BYTE_SIZE not in parameters:
        raise InvalidArgument(f"{kind} {name!r}: {BYTE_SIZE!r} must be given with {REGION!r}")
    values: dict[str, int] = {}
    for key in (BYTE_SIZE, OFFSET):
        parameter = parameters.get(key)
        if parameter is None:
            values[key] = 0
            continue
        choice = parameter.WhichOneof("parameter_choice")
        if choice == "int64_param":
            values[key] = parameter.int64_param
        elif choice == "uint64_param":
            values[key] = parameter.uint64_param
        else:
            raise InvalidArgument(f"{kind} {name!r}: {key!r} must be an int64_param")
        if values[key] < 0:
            raise InvalidArgument(f"{kind} {name!r}: {key!r} must be >= 0, got {values[key]}")
    return Target(region.string_param, values[OFFSET], values[BYTE_SIZE])


@dataclass(frozen=True)
class SharedRequest:
    """A request whose inputs are read in, and the regions its outputs go to."""

    registry: SharedMemoryRegistry
    request: pb.ModelInferRequest
    outputs: Mapping[str, Target]

    def place(self, name: str, data: bytes) -> bytes:
        """Writes output ``name`` into its region if it names one; returns what goes raw.

        As Triton: an output in shared memory keeps its place in raw_output_contents
        (so the list stays aligned with ``outputs``) with no bytes.
        """
        target = self.outputs.get(name)
        if target is None:
            return data
        what = f"output {name!r}"
        if len(data) > target.byte_size:
            raise InvalidArgument(
                f"{what}: shared memory byte size {target.byte_size} is too small for the "
                f"result ({len(data)} bytes)"
            )
        self.registry._region(target.region, what).write(target.offset, data, what)
        return b""
