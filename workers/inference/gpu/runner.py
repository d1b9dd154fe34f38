"""Runs batches of one model version on a CUDA GPU: instances on their own streams,
double-buffered pinned staging, optional CUDA graphs per batch-size bucket.

One call of :meth:`CudaRunner.run` (on an executor thread) takes a staging slot of the
least busy instance, copies the batch into that slot's pinned host buffer, queues the
host-to-device copy on the instance's copy stream, then, holding the instance's lock
only while it *queues* work, makes the compute stream wait for that copy, runs the
forward pass (or replays the captured graph of the batch's bucket), and queues the
device-to-host copy of the outputs into pinned memory. It then waits on that one
event: never a device-wide ``torch.cuda.synchronize``, so other instances and the
next batch staged on the same instance keep the GPU busy meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.inference.gpu.plan import STAGING_SLOTS, GpuPlan, SlotPool

log = logging.getLogger(__name__)

#: Passes per bucket before capture: TorchScript's profiling executor specializes the
#: graph over its first runs, and cuDNN picks its algorithms; a capture must see neither.
WARMUP_PASSES = 3

Forward = Callable[..., Any]
#: The model's result -> its outputs in config order (raises ModelError if it cannot).
Flatten = Callable[[Any], list[Any]]


@dataclass(frozen=True)
class InputLayout:
    """One input's per-row shape and dtype (batch dim excluded)."""

    dims: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Slot:
    pinned: list[torch.Tensor]
    staged_on_device: list[torch.Tensor]
    staged: torch.cuda.Event = field(default_factory=torch.cuda.Event)
    done: torch.cuda.Event = field(default_factory=torch.cuda.Event)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    outputs: list[torch.Tensor]


@dataclass
class _Instance:
    stream: torch.cuda.Stream
    copy_stream: torch.cuda.Stream
    slots: list[_Slot]
    #: Graph inputs: fixed addresses each bucket's graph reads its first rows from.
    static_inputs: list[torch.Tensor] = field(default_factory=list)
    graphs: dict[int, _Graph] = field(default_factory=dict)
    #: Held while queuing work on ``stream``, so that batches enter it whole and in order.
    lock: threading.Lock = field(default_factory=threading.Lock)


class CudaRunner:
    """Batches of one model version on ``device``, laid out as ``plan`` says."""

    def __init__(
        self,
        forward: Forward,
        flatten: Flatten,
        inputs: Sequence[InputLayout],
        max_batch_size: int,
        plan: GpuPlan,
        device: torch.device,
    ) -> None:
        self._forward = forward
        self._flatten = flatten
        self._layouts = list(inputs)
        self.plan = plan
        self.device = device
        self._pool = SlotPool(plan.instances, STAGING_SLOTS)
        self._instances = [self._new_instance(max_batch_size) for _ in range(plan.instances)]
        # Buffers are allocated on the default stream and then used on the instances' own:
        # once, at load, wait until the allocations are done (never on the request path).
        torch.cuda.synchronize(device)
        #: Whether the graphs were captured (False: the plan asked for none, or capture failed).
        self.graphs_captured = False
        if plan.cuda_graphs:
            self.graphs_captured = self._capture_all()

    # -- set-up ------------------------------------------------------------------------------

    def _buffer(self, rows: int, layout: InputLayout, *, pinned: bool) -> torch.Tensor:
        shape = (rows, *layout.dims)
        if pinned:
            return torch.empty(shape, dtype=layout.dtype, pin_memory=True)
        return torch.zeros(shape, dtype=layout.dtype, device=self.device)

    def _new_instance(self, rows: int) -> _Instance:
        slots = [
            _Slot(
                pinned=[self._buffer(rows, lay, pinned=True) for lay in self._layouts],
                staged_on_device=[self._buffer(rows, lay, pinned=False) for lay in self._layouts],
            )
            for _ in range(STAGING_SLOTS)
        ]
        streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))  # type: ignore[no-untyped-call]
        return _Instance(*streams, slots)

    def _capture_all(self) -> bool:
        """Captures every bucket on every instance; on any failure serves eagerly instead."""
        largest = self.plan.buckets[-1]
        try:
            for instance in self._instances:
                instance.static_inputs = [
                    self._buffer(largest, lay, pinned=False) for lay in self._layouts
                ]
                torch.cuda.synchronize(self.device)  # the zero-fill, as above
                # One memory pool per instance: its graphs never replay at once (the
                # instance lock orders them on one stream), so they may share memory;
                # the largest first, so the smaller ones fit in what it reserved.
                pool = torch.cuda.graph_pool_handle()
                for bucket in reversed(self.plan.buckets):
                    self._warm(instance, bucket)
                instance.stream.synchronize()  # at load only: capture starts from a quiet stream
                for bucket in reversed(self.plan.buckets):
                    instance.graphs[bucket] = self._capture(instance, bucket, pool)
        except Exception as exc:
            log.warning("CUDA graph capture failed; serving without graphs: %s", exc)
            for instance in self._instances:
                instance.graphs.clear()
                instance.static_inputs = []
            return False
        return True

    def _warm(self, instance: _Instance, bucket: int) -> None:
        """Every bucket's shapes run before any capture, so none re-specializes mid-capture."""
        args = [t[:bucket] for t in instance.static_inputs]
        with torch.inference_mode(), torch.cuda.stream(instance.stream):
            for _ in range(WARMUP_PASSES):
                self._flatten(self._forward(*args))

    def _capture(self, instance: _Instance, bucket: int, pool: Any) -> _Graph:
        args = [t[:bucket] for t in instance.static_inputs]
        graph = torch.cuda.CUDAGraph()
        # thread_local: forward passes of other versions may run on other threads meanwhile.
        with (
            torch.inference_mode(),
            torch.cuda.graph(
                graph, pool=pool, stream=instance.stream, capture_error_mode="thread_local"
            ),
        ):
            outputs = self._flatten(self._forward(*args))
        tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
        if len(tensors) != len(outputs) or any(t.shape[:1] != (bucket,) for t in tensors):
            raise ValueError("graph outputs must be tensors with the batch dimension first")
        return _Graph(graph, tensors)

    # -- the hot path ------------------------------------------------------------------------

    def run(self, inputs: Sequence[torch.Tensor], rows: int) -> list[Any]:
        """One batch of ``rows`` (blocking); outputs in config order, on the host."""
        index, slot_index = self._pool.acquire()
        try:
            instance = self._instances[index]
            slot = instance.slots[slot_index]
            try:
                self._stage(instance, slot, inputs, rows)
                with instance.lock:
                    host = self._compute(instance, slot, rows)
            except BaseException:
                # The slot's buffers may still be read by work queued before the failure;
                # the next batch must not overwrite them under it (a rare path: a model error).
                instance.copy_stream.synchronize()
                instance.stream.synchronize()
                raise
            # Waits for this batch's outputs only: the stream's later work and the other
            # instances' streams run on.
            slot.done.synchronize()
            return host
        finally:
            self._pool.release(index, slot_index)

    def _stage(
        self, instance: _Instance, slot: _Slot, inputs: Sequence[torch.Tensor], rows: int
    ) -> None:
        for source, pinned in zip(inputs, slot.pinned, strict=True):
            pinned[:rows].copy_(source)
        with torch.cuda.stream(instance.copy_stream):
            for pinned, device in zip(slot.pinned, slot.staged_on_device, strict=True):
                device[:rows].copy_(pinned[:rows], non_blocking=True)
            slot.staged.record(instance.copy_stream)

    def _compute(self, instance: _Instance, slot: _Slot, rows: int) -> list[Any]:
        stream = instance.stream
        bucket = self.plan.bucket_for(rows) if instance.graphs else None
        with torch.inference_mode(), torch.cuda.stream(stream):
            stream.wait_event(slot.staged)
            if bucket is not None:
                for static, staged in zip(
                    instance.static_inputs, slot.staged_on_device, strict=True
                ):
                    static[:rows].copy_(staged[:rows], non_blocking=True)
                    if rows < bucket:
                        # Padding rows are zeros, not a previous batch's data.
                        static[rows:bucket].zero_()
                captured = instance.graphs[bucket]
                captured.graph.replay()
                outputs: list[Any] = [t[:rows] for t in captured.outputs]
            else:
                args = [t[:rows] for t in slot.staged_on_device]
                outputs = self._flatten(self._forward(*args))
            host = [_to_pinned_host(value) for value in outputs]
            slot.done.record(stream)
        return host


def _to_pinned_host(value: Any) -> Any:
    """Queues a device tensor's copy into fresh pinned memory (returned before it lands)."""
    if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
        return value
    # A fresh buffer per batch: the batcher keeps views of it after this call returns,
    # and torch's pinned-memory cache recycles it only once its copy has finished.
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    return host
