"""The GPU plan, pure: instances, CUDA graph buckets, padding, slot assignment, validation.

Runs without a GPU; the CUDA shell that follows this plan is tested in test_cuda_runner.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mesh.errors import InvalidArgument
from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc
from tests.workers.inference.conftest import worker_client
from workers.inference import testing
from workers.inference.gpu.plan import (
    CUDA_GRAPHS_PARAMETER,
    GRAPH_SIZES_PARAMETER,
    GpuPlan,
    SlotPool,
)

GPU = mc.ModelInstanceGroup.KIND_GPU


def config(
    max_batch_size: int = 16,
    preferred: tuple[int, ...] = (),
    graphs: str | None = "true",
    sizes: str | None = None,
    groups: tuple[tuple[int, int, tuple[int, ...]], ...] = (),
    dims: tuple[int, ...] = (4,),
) -> mc.ModelConfig:
    cfg = testing.model_config(
        "m",
        [("x", testing.FP32, dims)],
        [("y", testing.FP32, [3])],
        max_batch_size=max_batch_size,
        preferred=preferred,
    )
    if graphs is not None:
        cfg.parameters[CUDA_GRAPHS_PARAMETER].string_value = graphs
    if sizes is not None:
        cfg.parameters[GRAPH_SIZES_PARAMETER].string_value = sizes
    for count, kind, gpus in groups:
        cfg.instance_group.add(count=count, kind=kind, gpus=list(gpus))
    return cfg


@pytest.mark.parametrize(
    ("kwargs", "buckets"),
    [
        ({"graphs": None}, ()),
        ({"graphs": "false"}, ()),
        ({"graphs": " TRUE "}, (1, 2, 4, 8, 16)),
        ({"max_batch_size": 12}, (1, 2, 4, 8, 12)),
        ({"max_batch_size": 128, "preferred": (32, 64)}, (32, 64, 128)),
        ({"sizes": "8, 2,8"}, (2, 8)),
    ],
)
def test_buckets_come_from_preferred_sizes_max_batch_size_or_the_parameter(
    kwargs: dict[str, object], buckets: tuple[int, ...]
) -> None:
    plan = GpuPlan.from_config(config(**kwargs))  # type: ignore[arg-type]
    assert plan.buckets == buckets
    assert plan.cuda_graphs == bool(buckets)


def test_a_batch_pads_up_to_the_smallest_bucket_that_holds_it() -> None:
    plan = GpuPlan(buckets=(32, 64, 128))
    assert [plan.bucket_for(n) for n in (1, 32, 33, 64, 100, 128)] == [32, 32, 64, 64, 128, 128]
    assert plan.bucket_for(129) is None  # larger than any graph: runs eagerly
    assert GpuPlan().bucket_for(1) is None  # no graphs at all


@pytest.mark.parametrize(
    ("groups", "instances"),
    [
        ((), 1),
        (((3, GPU, ()),), 3),
        (((0, GPU, ()),), 1),  # Triton reads a count of 0 as 1
        (((2, GPU, (0,)), (1, mc.ModelInstanceGroup.KIND_AUTO, ())), 3),
    ],
)
def test_instance_groups_add_up_to_instances_and_twice_as_many_batches_in_flight(
    groups: tuple[tuple[int, int, tuple[int, ...]], ...], instances: int
) -> None:
    plan = GpuPlan.from_config(config(groups=groups, graphs=None))
    assert plan.instances == instances
    assert plan.concurrency == 2 * instances


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"graphs": "yes"}, 'CUDA_GRAPHS must be "true" or "false", got \'yes\''),
        ({"max_batch_size": 0}, "CUDA_GRAPHS needs max_batch_size > 0"),
        ({"dims": (-1,)}, "CUDA_GRAPHS needs fixed dims; 'x' has dims [-1]"),
        ({"sizes": "8,a"}, "CUDA_GRAPH_BATCH_SIZES must list batch sizes"),
        ({"sizes": "8,32"}, "CUDA graph batch sizes [32] are not in [1, max_batch_size=16]"),
        ({"graphs": None, "sizes": "8"}, 'CUDA_GRAPH_BATCH_SIZES needs CUDA_GRAPHS: "true"'),
        ({"groups": ((-1, GPU, ()),)}, "count must be >= 0, got -1"),
        ({"groups": ((1, GPU, (1, 2)),)}, "gpus [1, 2] do not include this worker's GPU 0"),
    ],
)
def test_bad_gpu_settings_are_refused_by_name(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        GpuPlan.from_config(config(**kwargs))  # type: ignore[arg-type]
    assert message in str(raised.value)
    assert "model 'm'" in str(raised.value)


async def test_the_worker_refuses_a_bad_cuda_graphs_value_on_the_cpu_too(tmp_path: Path) -> None:
    """One repository serves CPU and GPU workers: a config is judged the same on both."""
    testing.publish(str(tmp_path), config(graphs="maybe"), testing.seeded(testing.MLP(), 0))
    async with worker_client(tmp_path, "cpu") as client:
        reply = await client.stub.RepositoryIndex(pb.RepositoryIndexRequest())
        [entry] = reply.models
        assert entry.state == "UNAVAILABLE"
        assert 'CUDA_GRAPHS must be "true" or "false", got \'maybe\'' in entry.reason


def test_slots_spread_over_instances_before_any_instance_stages_a_second() -> None:
    pool = SlotPool(instances=3, slots=2)
    taken = [pool.acquire() for _ in range(6)]
    assert taken == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert pool.busy() == [2, 2, 2]
    pool.release(1, 0)
    assert pool.acquire() == (1, 0)
    pool.release(2, 1)
    pool.release(2, 0)
    assert pool.busy() == [2, 2, 0]
    assert pool.acquire() == (2, 0)
    with pytest.raises(ValueError, match="slot 1 of instance 2 is not taken"):
        pool.release(2, 1)


def test_a_caller_waits_for_a_free_slot_and_gets_the_one_released() -> None:
    pool = SlotPool(instances=1, slots=1)
    assert pool.acquire() == (0, 0)
    with pytest.raises(TimeoutError):
        pool.acquire(timeout=0.01)
    got: list[tuple[int, int]] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=10)))
    waiter.start()
    pool.release(0, 0)
    waiter.join(10)
    assert got == [(0, 0)]
