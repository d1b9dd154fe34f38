"""Dynamic batching: the pure decision table, and the batcher running real torch models."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from workers.inference import testing
from workers.inference.batcher import (
    BatchPolicy,
    Dispatch,
    DynamicBatcher,
    Wait,
    plan_batch,
    recent_average,
    runs_inline,
)
from workers.inference.model import LoadedModel, ModelError, Signature
from workers.inference.stats import Statistics
from workers.inference.tensors import Tensor

POLICY = BatchPolicy(max_batch_size=8, max_queue_delay_s=0.010)
PREFERRED = BatchPolicy(max_batch_size=8, max_queue_delay_s=0.010, preferred_sizes=(2, 4))


@pytest.mark.parametrize(
    ("sizes", "waited", "policy", "expected"),
    [
        ([], 0.0, POLICY, Wait(float("inf"))),
        ([1, 1], 0.0, POLICY, Wait(0.010)),  # not full, delay not over: wait for more
        ([1, 1], 0.004, POLICY, Wait(0.006)),
        ([1, 1], 0.010, POLICY, Dispatch(2)),  # delay over: run what is there
        ([4, 4], 0.0, POLICY, Dispatch(2)),  # exactly full: run now
        ([4, 3, 2], 0.0, POLICY, Dispatch(2)),  # the next one would not fit: run now
        ([8], 0.0, POLICY, Dispatch(1)),
        ([1, 1, 1], 0.0, PREFERRED, Dispatch(2)),  # largest preferred size that forms
        ([1, 1, 1, 1, 1], 0.0, PREFERRED, Dispatch(4)),
        ([3], 0.0, PREFERRED, Wait(0.010)),
        ([1, 1], 0.0, BatchPolicy(8, 0.0), Dispatch(2)),  # no delay: run whatever queued
        ([1, 1], 0.0, BatchPolicy(8, 0.010, enabled=False), Dispatch(1)),  # batching off
        ([1, 1], 0.0, BatchPolicy(0), Dispatch(1)),  # model does not batch
    ],
)
def test_plan_batch(
    sizes: list[int], waited: float, policy: BatchPolicy, expected: Dispatch | Wait
) -> None:
    decision = plan_batch(sizes, waited, policy)
    if isinstance(expected, Wait) and isinstance(decision, Wait):
        assert decision.seconds == pytest.approx(expected.seconds)
    else:
        assert decision == expected


def test_policy_from_config_follows_triton() -> None:
    config = testing.mlp_config(max_batch_size=16, queue_delay_us=500, preferred=(4, 8))
    assert BatchPolicy.from_config(config) == BatchPolicy(16, 0.0005, (4, 8))
    assert not BatchPolicy.from_config(testing.mlp_config(queue_delay_us=None)).batches
    with pytest.raises(ValueError, match=r"preferred batch sizes \[32\]"):
        BatchPolicy(16, 0.0, (32,))


async def until(condition: Callable[[], bool], seconds: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def loaded(module: Callable[..., torch.Tensor], config_name: str = "mlp") -> LoadedModel:
    config = (
        testing.mlp_config(config_name)
        if config_name == "mlp"
        else testing.model_config(
            config_name, [("x", testing.FP32, [2])], [("y", testing.FP32, [2])]
        )
    )
    return LoadedModel(Signature.from_config(config), 1, module, torch.device("cpu"), 0)


async def run_all(batcher: DynamicBatcher, inputs: list[dict[str, Tensor]]) -> list[object]:
    return await asyncio.gather(*(batcher.infer(i) for i in inputs), return_exceptions=True)


async def test_concurrent_requests_run_in_fewer_passes_with_identical_results() -> None:
    module = testing.seeded(testing.MLP(), 3, exact=True)
    stats = Statistics()
    batcher = DynamicBatcher(loaded(module), BatchPolicy(16, 0.050), stats)
    generator = torch.Generator().manual_seed(0)
    xs = [
        torch.round(torch.randn(size, 4, generator=generator) * 4) / 4
        for size in (1, 2, 1, 3, 1, 1)
    ]
    results = await run_all(batcher, [{"x": x} for x in xs])
    assert batcher.executions < len(xs)
    for x, result in zip(xs, results, strict=True):
        assert isinstance(result, dict)
        assert torch.equal(result["y"], module(x))  # bit for bit: batching changes nothing
    [snapshot] = stats.snapshot([("mlp", 1)])
    assert snapshot.execution_count == batcher.executions
    assert snapshot.inference_count == sum(x.shape[0] for x in xs)
    assert snapshot.inference_stats.queue.count == len(xs)


async def test_batching_off_runs_each_request_alone() -> None:
    module = testing.seeded(testing.MLP(), 3)
    batcher = DynamicBatcher(loaded(module), BatchPolicy(16, 0.050, enabled=False), Statistics())
    results = await run_all(batcher, [{"x": torch.ones(1, 4)} for _ in range(5)])
    assert batcher.executions == 5
    assert all(isinstance(r, dict) for r in results)


@pytest.mark.parametrize("own_executor", [False, True], ids=["loop-default", "given"])
async def test_a_failing_request_does_not_fail_its_batch_mates(own_executor: bool) -> None:
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = DynamicBatcher(
            loaded(testing.Fragile(), "fragile"),
            BatchPolicy(16, 0.050),
            Statistics(),
            executor if own_executor else None,
        )
        xs = [torch.full((1, 2), 1.0), torch.full((1, 2), -1.0), torch.full((2, 2), 3.0)]
        results = await run_all(batcher, [{"x": x} for x in xs])
    assert isinstance(results[1], ModelError)
    assert "failed in forward: RuntimeError" in str(results[1])
    assert "/secret/path" not in str(results[1])  # the model's own text stays in the log
    for i in (0, 2):
        result = results[i]
        assert isinstance(result, dict) and torch.equal(result["y"], xs[i] * 2)


async def test_requests_with_different_variable_dims_are_not_mixed() -> None:
    config = testing.model_config("v", [("x", testing.FP32, [-1])], [("y", testing.FP32, [-1])])
    model = LoadedModel(Signature.from_config(config), 1, testing.Fragile(), torch.device("cpu"), 0)
    batcher = DynamicBatcher(model, BatchPolicy(16, 0.020), Statistics())
    xs = [torch.ones(1, 2), torch.ones(1, 3), torch.ones(2, 2), torch.ones(1, 3)]
    results = await run_all(batcher, [{"x": x} for x in xs])
    for x, result in zip(xs, results, strict=True):
        assert isinstance(result, dict) and torch.equal(result["y"], x * 2)
    assert batcher.executions == 2  # one batch per shape


async def test_a_dead_executor_fails_the_queued_requests_instead_of_hanging() -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    executor.shutdown()
    module = testing.seeded(testing.MLP(), 3)
    batcher = DynamicBatcher(loaded(module), BatchPolicy(16, 0.0), Statistics(), executor)
    results = await asyncio.wait_for(run_all(batcher, [{"x": torch.ones(1, 4)}] * 3), 30)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_instances_let_batches_of_one_version_run_at_once() -> None:
    # Two requests that cannot share a batch (different shapes) meet at a barrier
    # inside the model: only two concurrent executions get both through.
    barrier = threading.Barrier(2)

    def forward(x: torch.Tensor) -> torch.Tensor:
        barrier.wait(timeout=30)
        return x * 2

    config = testing.model_config("v", [("x", testing.FP32, [-1])], [("y", testing.FP32, [-1])])
    config.instance_group.add(count=2)
    policy = BatchPolicy.from_config(config)
    assert policy.instances == 2
    model = LoadedModel(Signature.from_config(config), 1, forward, torch.device("cpu"), 0)
    with ThreadPoolExecutor(max_workers=2) as executor:
        batcher = DynamicBatcher(model, policy, Statistics(), executor)
        xs = [torch.ones(1, 2), torch.ones(1, 3)]
        results = await asyncio.wait_for(run_all(batcher, [{"x": x} for x in xs]), 60)
    for x, result in zip(xs, results, strict=True):
        assert isinstance(result, dict) and torch.equal(result["y"], x * 2)


class RecordingExecutor(ThreadPoolExecutor):
    """One thread; notes each batch handed to it in a shared log."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(max_workers=1)
        self.log = log

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.log.append("batch started")
        return super().submit(fn, *args, **kwargs)


async def test_a_finished_batch_starts_the_next_before_its_requests_are_answered() -> None:
    # The instance must not idle while the event loop answers a batch's callers
    # (and reads their next requests): the queued batch is handed over first.
    gates = [threading.Event(), threading.Event()]
    calls = iter(gates)

    def forward(x: torch.Tensor) -> torch.Tensor:
        assert next(calls).wait(timeout=30)
        return x * 2

    log: list[str] = []
    with RecordingExecutor(log) as executor:
        batcher = DynamicBatcher(loaded(forward, "v"), BatchPolicy(16, 0.0), Statistics(), executor)

        async def answered(x: torch.Tensor) -> dict[str, Tensor]:
            outputs = await batcher.infer({"x": x})
            log.append("first answered")  # where the caller resumes, as a servicer would
            return outputs

        first = asyncio.create_task(answered(torch.ones(1, 2)))
        await until(lambda: log == ["batch started"])
        rest = [asyncio.create_task(batcher.infer({"x": torch.full((1, 2), i)})) for i in (2, 3)]
        await until(lambda: batcher.queue_depth == 2)
        gates[0].set()
        assert torch.equal(torch.as_tensor((await first)["y"]), torch.full((1, 2), 2.0))
        assert log == ["batch started", "batch started", "first answered"]
        assert batcher.queue_depth == 0  # both queued requests went into that one batch
        gates[1].set()
        answers = await asyncio.gather(*rest)
    assert [torch.as_tensor(a["y"]).tolist() for a in answers] == [[[4.0, 4.0]], [[6.0, 6.0]]]
    assert batcher.executions == 2


@pytest.mark.parametrize(
    ("recent", "limit", "inline"),
    [
        (None, 1.0, False),  # never measured: the executor, whatever the limit
        (0.0001, 0.0005, True),
        (0.0005, 0.0005, True),
        (0.002, 0.0005, False),
        (0.0001, -1.0, False),  # a negative limit: never (the GPU path)
    ],
)
def test_runs_inline(recent: float | None, limit: float, inline: bool) -> None:
    assert runs_inline(recent, limit) is inline


def test_recent_average_starts_at_the_first_pass_and_follows_the_newest() -> None:
    recent = recent_average(None, 0.001)
    assert recent == 0.001
    for _ in range(50):
        recent = recent_average(recent, 0.010)
    assert recent == pytest.approx(0.010, rel=1e-3)


@pytest.mark.parametrize(("limit", "on_loop_after_first"), [(1.0, True), (0.0, False)])
async def test_short_passes_run_on_the_event_loop_after_the_first(
    limit: float, on_loop_after_first: bool
) -> None:
    threads: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        threads.append(threading.get_ident())
        return x * 2

    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = DynamicBatcher(
            loaded(forward, "v"), BatchPolicy(16, 0.0), Statistics(), executor, inline_limit_s=limit
        )
        for i in range(3):
            outputs = await batcher.infer({"x": torch.full((1, 2), float(i))})
            assert torch.equal(torch.as_tensor(outputs["y"]), torch.full((1, 2), 2.0 * i))
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread  # unmeasured: off the loop
    assert [t == loop_thread for t in threads[1:]] == [on_loop_after_first] * 2
    assert batcher.recent_pass_s is not None and batcher.executions == 3


async def test_arrivals_during_a_queue_delay_keep_its_timer() -> None:
    # The wait ends when the oldest request's delay does: later arrivals re-plan, but
    # must not cancel and re-arm the timer (per-request work on the hot path).
    module = testing.seeded(testing.MLP(), 3)
    batcher = DynamicBatcher(loaded(module), BatchPolicy(16, 30.0), Statistics())
    first = asyncio.create_task(batcher.infer({"x": torch.ones(1, 4)}))
    await until(lambda: batcher._timer is not None)
    timer = batcher._timer
    rest = [asyncio.create_task(batcher.infer({"x": torch.ones(1, 4)})) for _ in range(3)]
    await until(lambda: batcher.queue_depth == 4 and not batcher._planning)
    assert batcher._timer is timer and timer is not None and not timer.cancelled()
    for task in [first, *rest]:
        task.cancel()
    await asyncio.gather(first, *rest, return_exceptions=True)
    timer.cancel()
