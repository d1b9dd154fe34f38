"""Per model-version inference statistics (Triton's ModelStatistics) and the worker's load report."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from protos.inference import grpc_service_pb2 as pb


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(ns, 0)

    def to_proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class _BatchFigures:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


@dataclass
class VersionStats:
    """Cumulative figures of one model version.

    ``inference_count`` counts batch elements and ``execution_count`` forward passes,
    so ``inference_count / execution_count`` is the average batch the batcher formed.
    """

    name: str
    version: int
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    batches: dict[int, _BatchFigures] = field(default_factory=dict)
    memory_bytes: int = 0
    memory_kind: str = "CPU"
    device_index: int = 0

    def to_proto(self) -> pb.ModelStatistics:
        stats = pb.ModelStatistics(
            name=self.name,
            version=str(self.version),
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.to_proto(),
                fail=self.fail.to_proto(),
                queue=self.queue.to_proto(),
                compute_input=self.compute_input.to_proto(),
                compute_infer=self.compute_infer.to_proto(),
                compute_output=self.compute_output.to_proto(),
            ),
        )
        for size in sorted(self.batches):
            figures = self.batches[size]
            stats.batch_stats.add(
                batch_size=size,
                compute_input=figures.compute_input.to_proto(),
                compute_infer=figures.compute_infer.to_proto(),
                compute_output=figures.compute_output.to_proto(),
            )
        if self.memory_bytes:
            stats.memory_usage.add(
                type=self.memory_kind, id=self.device_index, byte_size=self.memory_bytes
            )
        return stats


class Statistics:
    """Thread-safe: batches finish on executor threads while RPCs read on the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], VersionStats] = {}

    def _get(self, name: str, version: int) -> VersionStats:
        key = (name, version)
        stats = self._versions.get(key)
        if stats is None:
            stats = self._versions[key] = VersionStats(name, version)
        return stats

    def record_request(
        self, name: str, version: int, *, ok: bool, total_ns: int, now_ms: int
    ) -> None:
        """One request finished (success counts one per request, as in Triton)."""
        with self._lock:
            stats = self._get(name, version)
            (stats.success if ok else stats.fail).add(total_ns)
            if ok:
                stats.last_inference_ms = now_ms

    def record_queue(self, name: str, version: int, queue_ns: int, count: int = 1) -> None:
        """``count`` requests waited ``queue_ns`` in all (a batch is recorded at once)."""
        with self._lock:
            self._get(name, version).queue.add(queue_ns, count)

    def record_execution(
        self,
        name: str,
        version: int,
        *,
        batch_size: int,
        requests: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        """One successful forward pass over ``requests`` requests of ``batch_size`` elements."""
        with self._lock:
            stats = self._get(name, version)
            stats.execution_count += 1
            stats.inference_count += batch_size
            # Per-request phase totals: every request in the batch spent that time.
            stats.compute_input.add(input_ns * requests, requests)
            stats.compute_infer.add(infer_ns * requests, requests)
            stats.compute_output.add(output_ns * requests, requests)
            figures = stats.batches.setdefault(batch_size, _BatchFigures())
            figures.compute_input.add(input_ns)
            figures.compute_infer.add(infer_ns)
            figures.compute_output.add(output_ns)

    def record_memory(self, name: str, version: int, byte_size: int, kind: str, index: int) -> None:
        with self._lock:
            stats = self._get(name, version)
            stats.memory_bytes, stats.memory_kind, stats.device_index = byte_size, kind, index

    def snapshot(self, keys: Iterable[tuple[str, int]]) -> list[pb.ModelStatistics]:
        with self._lock:
            return [self._get(name, version).to_proto() for name, version in keys]
