"""How a model version executes on a GPU, decided from its config alone (pure, no CUDA).

* ``instance_group { count: N kind: KIND_GPU }``: N instances of the model on the worker's
  GPU, each issuing its forward passes on a CUDA stream of its own, so one instance's
  kernels run while another's inputs are copied in or its outputs copied out.
* Each instance has :data:`STAGING_SLOTS` staging slots (pinned host and device input
  buffers): while one batch computes, the next is copied in on a side stream (double
  buffering). The batcher may therefore keep ``instances * STAGING_SLOTS`` batches in
  flight (:attr:`GpuPlan.concurrency`).
* ``parameters { key: "CUDA_GRAPHS" value { string_value: "true" } }`` (opt-in, like
  ``OPTIMIZE_FOR_INFERENCE``) captures the forward pass as one CUDA graph per batch-size
  bucket; a batch is padded up to the smallest bucket that holds it. Buckets are the
  ``dynamic_batching`` preferred sizes plus ``max_batch_size``, or powers of two up to
  ``max_batch_size`` when no sizes are preferred; ``CUDA_GRAPH_BATCH_SIZES: "8,32,128"``
  names them outright.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.errors import InvalidArgument
from protos.inference import model_config_pb2 as mc

#: config.pbtxt ``parameters`` key: "true" captures CUDA graphs per batch-size bucket.
CUDA_GRAPHS_PARAMETER = "CUDA_GRAPHS"
#: config.pbtxt ``parameters`` key: the bucket sizes, comma-separated (optional).
GRAPH_SIZES_PARAMETER = "CUDA_GRAPH_BATCH_SIZES"
#: Batches one instance holds at once: one computing, one being staged (double buffering).
STAGING_SLOTS = 2

_GPU_KINDS = (mc.ModelInstanceGroup.KIND_AUTO, mc.ModelInstanceGroup.KIND_GPU)


@dataclass(frozen=True)
class GpuPlan:
    """Instances on one GPU and the batch sizes captured as CUDA graphs (empty: none)."""

    instances: int = 1
    buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be distinct positive sizes, ascending: {self.buckets}")

    @property
    def cuda_graphs(self) -> bool:
        return bool(self.buckets)

    @property
    def concurrency(self) -> int:
        """Batches worth keeping in flight: every instance computing one, staging another."""
        return self.instances * STAGING_SLOTS

    def bucket_for(self, rows: int) -> int | None:
        """The smallest captured batch size that holds ``rows``; None: run eagerly."""
        for bucket in self.buckets:
            if bucket >= rows:
                return bucket
        return None

    @classmethod
    def from_config(cls, config: mc.ModelConfig, device_index: int = 0) -> GpuPlan:
        """The plan for ``config`` on GPU ``device_index``; bad values are InvalidArgument."""
        return cls(_instances(config, device_index), _buckets(config))


def _instances(config: mc.ModelConfig, device_index: int) -> int:
    total = 0
    for group in config.instance_group:
        where = f"model {config.name!r}: instance_group {group.name or '#'}"
        if group.count < 0:
            raise InvalidArgument(f"{where}: count must be >= 0, got {group.count}")
        if group.gpus and group.kind in _GPU_KINDS and device_index not in group.gpus:
            # A worker serves one device; a group pinned elsewhere would be silently dropped.
            raise InvalidArgument(
                f"{where}: gpus {list(group.gpus)} do not include this worker's GPU "
                f"{device_index}; run a worker per GPU with its own --device"
            )
        # Triton reads a count of 0 as 1.
        total += max(group.count, 1)
    return max(total, 1)


def cuda_graphs_requested(config: mc.ModelConfig) -> bool:
    """The ``CUDA_GRAPHS`` parameter: "true" or "false" (the default)."""
    parameter = config.parameters.get(CUDA_GRAPHS_PARAMETER)
    if parameter is None:
        return False
    value = parameter.string_value.strip().lower()
    if value not in ("true", "false"):
        raise InvalidArgument(
            f'model {config.name!r}: parameter {CUDA_GRAPHS_PARAMETER} must be "true" or '
            f'"false", got {parameter.string_value!r}'
        )
    return value == "true"


def _buckets(config: mc.ModelConfig) -> tuple[int, ...]:
    explicit = config.parameters.get(GRAPH_SIZES_PARAMETER)
    if not cuda_graphs_requested(config):
        if explicit is not None:
            raise InvalidArgument(
                f"model {config.name!r}: {GRAPH_SIZES_PARAMETER} needs "
                f'{CUDA_GRAPHS_PARAMETER}: "true"'
            )
        return ()
    name, limit = config.name, config.max_batch_size
    if limit <= 0:
        raise InvalidArgument(
            f"model {name!r}: {CUDA_GRAPHS_PARAMETER} needs max_batch_size > 0 "
            "(graphs are captured per batch size)"
        )
    # Graphs replay fixed shapes into fixed buffers: every other dim must be fixed.
    tensors: list[mc.ModelInput | mc.ModelOutput] = [*config.input, *config.output]
    for tensor in tensors:
        if any(d < 0 for d in tensor.dims):
            raise InvalidArgument(
                f"model {name!r}: {CUDA_GRAPHS_PARAMETER} needs fixed dims; "
                f"{tensor.name!r} has dims {list(tensor.dims)}"
            )
        if tensor.data_type == mc.TYPE_STRING:
            raise InvalidArgument(
                f"model {name!r}: {CUDA_GRAPHS_PARAMETER} needs tensors; "
                f"{tensor.name!r} is TYPE_STRING"
            )
    if explicit is not None:
        sizes = _parse_sizes(name, explicit.string_value)
    elif config.dynamic_batching.preferred_batch_size:
        sizes = {*config.dynamic_batching.preferred_batch_size, limit}
    else:
        sizes = {1 << i for i in range(limit.bit_length()) if 1 << i <= limit} | {limit}
    bad = sorted(s for s in sizes if not 0 < s <= limit)
    if bad:
        raise InvalidArgument(
            f"model {name!r}: CUDA graph batch sizes {bad} are not in [1, max_batch_size={limit}]"
        )
    return tuple(sorted(sizes))


def _parse_sizes(name: str, text: str) -> set[int]:
    try:
        sizes = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        sizes = set()
    if not sizes:
        raise InvalidArgument(
            f"model {name!r}: {GRAPH_SIZES_PARAMETER} must list batch sizes like "
            f'"8,32,128", got {text!r}'
        )
    return sizes


class SlotPool:
    """Hands out (instance, slot) pairs to the threads running batches (thread-safe).

    A batch goes to the instance with the fewest batches in hand (ties: the lowest
    index), so N batches in flight spread over N instances before any instance stages
    a second one; a caller blocks while every slot is taken.
    """

    def __init__(self, instances: int, slots: int = STAGING_SLOTS) -> None:
        if instances < 1 or slots < 1:
            raise ValueError("instances and slots must be >= 1")
        self._free: list[list[int]] = [list(range(slots)) for _ in range(instances)]
        self._slots = slots
        self._changed = threading.Condition()

    def busy(self) -> list[int]:
        """Slots taken per instance."""
        with self._changed:
            return [self._slots - len(free) for free in self._free]

    def acquire(self, timeout: float | None = None) -> tuple[int, int]:
        with self._changed:
            if not self._changed.wait_for(lambda: any(self._free), timeout):
                raise TimeoutError("every GPU instance slot is busy")
            instance = _least_busy([len(free) for free in self._free])
            return instance, self._free[instance].pop(0)

    def release(self, instance: int, slot: int) -> None:
        with self._changed:
            if slot in self._free[instance]:
                raise ValueError(f"slot {slot} of instance {instance} is not taken")
            self._free[instance].append(slot)
            self._free[instance].sort()
            self._changed.notify()


def _least_busy(free: Sequence[int]) -> int:
    """The index with the most free slots (the fewest busy); ties go to the lowest index."""
    return max(range(len(free)), key=lambda i: (free[i], -i))
