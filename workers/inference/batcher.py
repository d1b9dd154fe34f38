"""Dynamic batching per model version: a pure decision of when to run, and the shell that runs.

Requests queue per (model, version). The decision (:func:`plan_batch`) takes the queued
requests' batch sizes and how long the oldest has waited; the shell concatenates the
chosen requests along dim 0, runs one forward pass off the event loop and splits the
outputs back. Requests are only batched with others of the same non-batch shapes, and a
batch whose forward pass fails is re-run request by request, so a bad request never
fails its batch-mates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import torch

from mesh.errors import InvalidArgument
from protos.inference import model_config_pb2 as mc
from workers.inference.model import LoadedModel, ModelError
from workers.inference.stats import Statistics
from workers.inference.tensors import BytesTensor, Tensor, shape_of


@dataclass(frozen=True)
class BatchPolicy:
    """How a model version batches; ``max_batch_size`` 0 means the model does not batch."""

    max_batch_size: int = 0
    max_queue_delay_s: float = 0.0
    preferred_sizes: tuple[int, ...] = ()
    enabled: bool = True
    #: Batches of one version that may run at once (Triton's instance_group count).
    instances: int = 1

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError("instances must be >= 1")
        if self.max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 0")
        if self.max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        bad = [p for p in self.preferred_sizes if not 0 < p <= max(self.max_batch_size, 0)]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} are not in [1, max_batch_size]")

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> BatchPolicy:
        """Triton's rule: a model batches dynamically only with a ``dynamic_batching`` block.

        ``instance_group`` counts add up to the number of concurrent executions (one
        device here, so kinds and GPU lists do not multiply it).
        """
        instances = max(sum(g.count for g in config.instance_group), 1)
        if config.max_batch_size <= 0 or not config.HasField("dynamic_batching"):
            return cls(
                max_batch_size=max(config.max_batch_size, 0), enabled=False, instances=instances
            )
        db = config.dynamic_batching
        try:
            return cls(
                max_batch_size=config.max_batch_size,
                max_queue_delay_s=db.max_queue_delay_microseconds / 1e6,
                preferred_sizes=tuple(sorted(set(db.preferred_batch_size))),
                instances=instances,
            )
        except ValueError as exc:
            raise InvalidArgument(f"model {config.name!r}: dynamic_batching: {exc}") from None

    @property
    def batches(self) -> bool:
        return self.enabled and self.max_batch_size > 0

    def without_batching(self) -> BatchPolicy:
        return dataclasses.replace(self, enabled=False)


@dataclass(frozen=True)
class Dispatch:
    """Run the first ``count`` queued (compatible) requests now."""

    count: int


@dataclass(frozen=True)
class Wait:
    """Nothing to run yet; decide again after ``seconds`` or on the next arrival."""

    seconds: float


def plan_batch(sizes: Sequence[int], waited_s: float, policy: BatchPolicy) -> Dispatch | Wait:
    """When and how much to run, from the queued requests' batch sizes (FIFO order).

    Runs at once when the batch is full (``max_batch_size`` reached, or the next request
    would not fit) or when a preferred size can be formed (the largest one); otherwise
    waits until the oldest request has waited ``max_queue_delay``.
    """
    if not sizes:
        return Wait(float("inf"))
    if not policy.batches:
        return Dispatch(1)
    fitting, total = 0, 0
    totals: list[int] = []
    for size in sizes:
        if fitting and total + size > policy.max_batch_size:
            break
        fitting += 1
        total += size
        totals.append(total)
    if total >= policy.max_batch_size or fitting < len(sizes):
        return Dispatch(fitting)
    preferred = [i + 1 for i, t in enumerate(totals) if t in policy.preferred_sizes]
    if preferred:
        return Dispatch(preferred[-1])
    if waited_s >= policy.max_queue_delay_s:
        return Dispatch(fitting)
    return Wait(policy.max_queue_delay_s - waited_s)


#: A CPU batch whose recent passes took at most this long runs on the event loop itself.
INLINE_LIMIT_S = 0.0005
#: Weight of the newest pass in the recent average (an exponential moving average).
RECENT_WEIGHT = 0.2


def runs_inline(recent_s: float | None, limit_s: float) -> bool:
    """Whether the next batch runs on the event loop instead of an executor thread.

    Handing a batch to a thread and its results back costs two thread wake-ups and GIL
    hand-offs under load, more than a small model's whole forward pass on the CPU: the
    worker spent 450-600 µs of CPU per request that way against 350-390 µs inline
    (issue 17, docs/benchmarks.md). Inline, a pass blocks the loop, so only passes known
    to be short run there; an unmeasured one (the first) goes to the executor.
    """
    return recent_s is not None and recent_s <= limit_s


def recent_average(recent_s: float | None, sample_s: float) -> float:
    return sample_s if recent_s is None else recent_s + (sample_s - recent_s) * RECENT_WEIGHT


@dataclass
class _Pending:
    inputs: Mapping[str, Tensor]
    size: int
    key: tuple[tuple[str, tuple[int, ...]], ...]
    enqueued: float
    future: asyncio.Future[dict[str, Tensor]] = field(repr=False)


def _concat(values: Sequence[Tensor]) -> Tensor:
    first = values[0]
    if isinstance(first, BytesTensor):
        items: list[bytes] = []
        for v in values:
            assert isinstance(v, BytesTensor)
            items.extend(v.values)
        rows = sum(v.shape[0] for v in values)
        return BytesTensor(tuple(items), (rows, *first.shape[1:]))
    return torch.cat([v for v in values if isinstance(v, torch.Tensor)], dim=0)


def _split(name: str, value: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    rows = shape_of(value)[0] if shape_of(value) else None
    if rows != sum(sizes):
        raise ModelError(
            f"output {name!r} has {rows} rows for a batch of {sum(sizes)}; "
            "a batching model must keep the batch dimension first"
        )
    if isinstance(value, BytesTensor):
        per_row = len(value.values) // rows if rows else 0
        parts: list[Tensor] = []
        start = 0
        for size in sizes:
            chunk = value.values[start * per_row : (start + size) * per_row]
            parts.append(BytesTensor(chunk, (size, *value.shape[1:])))
            start += size
        return parts
    return list(torch.split(value, list(sizes), dim=0))


def _settle(
    batch: Sequence[_Pending], results: Sequence[dict[str, Tensor] | BaseException]
) -> None:
    """Hands each request its result; callers that gave up are skipped."""
    for p, result in zip(batch, results, strict=True):
        if p.future.done():
            continue
        if isinstance(result, BaseException):
            p.future.set_exception(result)
        else:
            p.future.set_result(result)


def _call_soon_threadsafe(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object
) -> None:
    # RuntimeError: the loop closed while the batch ran, so nobody is waiting for it.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


class DynamicBatcher:
    """Queues requests for one loaded model version and runs them in batches.

    Up to ``policy.instances`` batches run at a time per version (one by default);
    requests arriving meanwhile queue up and form the next, larger batch, which is
    where the throughput comes from.

    Scheduling runs in plain callbacks on the event loop (no task of its own): new
    arrivals (once per loop iteration), a finished batch and an expired queue delay
    each re-plan. A finished batch starts the next one *before* its requests are
    answered, so an instance does not idle while the loop encodes replies and reads
    new requests. Going through a scheduling task, an event and ``run_in_executor``
    cost several loop iterations between batches: the instance sat idle a quarter to
    a third of the time at concurrency 64 (docs/benchmarks.md).

    On the CPU, a batch whose recent passes were short (:func:`runs_inline`) runs on the
    loop itself, with no thread hand-off at all.
    """

    def __init__(
        self,
        model: LoadedModel,
        policy: BatchPolicy,
        stats: Statistics,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        inline_limit_s: float = INLINE_LIMIT_S,
    ) -> None:
        self.model = model
        self.policy = policy
        self._stats = stats
        #: Where forward passes run; None: the event loop's default executor.
        self._executor = executor
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._running = 0
        #: A re-plan for when the oldest request's queue delay runs out.
        self._timer: asyncio.TimerHandle | None = None
        #: The request whose queue delay the timer waits out: while it heads the queue,
        #: arrivals leave the timer alone instead of cancelling and re-arming it.
        self._timer_head: _Pending | None = None
        #: The loop this batcher serves, looked up once (on Python 3.11 each lookup asks
        #: the kernel for the pid, a syscall on every request).
        self._loop: asyncio.AbstractEventLoop | None = None
        #: A re-plan already scheduled for arrivals in this loop iteration.
        self._planning = False
        self.executions = 0
        #: CPU only: a GPU pass is the GPU path's to schedule (streams, staging).
        self._inline_limit_s = inline_limit_s if model.device.type == "cpu" else -1.0
        #: Recent average time of a batch's pass (None until one ran); written on the
        #: thread that ran it (a float store is atomic under the GIL).
        self.recent_pass_s: float | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def infer(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Runs ``inputs`` (already validated) in some batch; returns this request's outputs."""
        batched = self.model.signature.max_batch_size > 0
        size = next(iter(shape_of(t)[0] for t in inputs.values())) if batched else 1
        key = tuple(
            sorted((n, shape_of(t)[1:] if batched else shape_of(t)) for n, t in inputs.items())
        )
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Tensor]] = loop.create_future()
        self._queue.append(_Pending(inputs, size, key, self._clock(), future))
        if not self._planning:
            # Once per loop iteration: requests that arrive together are planned together.
            self._planning = True
            loop.call_soon(self._arrived)
        return await future

    def _arrived(self) -> None:
        self._planning = False
        self._plan()

    def _timer_fired(self) -> None:
        self._timer = self._timer_head = None
        self._plan()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_head = None

    def _plan(self) -> None:
        """Starts every batch that should run now; arms a timer for the next decision."""
        while self._running < self.policy.instances:
            # Requests whose caller gave up (deadline, cancellation) leave the queue.
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()
            if not self._queue:
                break
            head = self._queue[0]
            group = [p for p in self._queue if p.key == head.key and not p.future.done()]
            decision = plan_batch(
                [p.size for p in group], self._clock() - head.enqueued, self.policy
            )
            if isinstance(decision, Wait):
                # The wait ends when the head's queue delay does: a timer armed for this
                # head already fires then.
                if self._timer_head is not head:
                    self._disarm()
                    assert self._loop is not None  # set by the first infer
                    self._timer = self._loop.call_later(decision.seconds, self._timer_fired)
                    self._timer_head = head
                return
            batch = group[: decision.count]
            chosen = {id(p) for p in batch}
            self._queue = deque(p for p in self._queue if id(p) not in chosen)
            started = self._clock()
            # One lock and one update per batch, not per request.
            self._stats.record_queue(
                self.model.name,
                self.model.version,
                sum(int((started - p.enqueued) * 1e9) for p in batch),
                count=len(batch),
            )
            self._start(batch)
        # Nothing queued, or every instance is busy: requests keep queuing, so the next
        # batch grows, and the first batch to finish plans again.
        self._disarm()

    def _start(self, batch: Sequence[_Pending]) -> None:
        """Hands one batch to the executor; :meth:`_finished` runs on the loop when it is done."""
        loop = self._loop
        assert loop is not None  # set by the first infer
        self._running += 1
        try:
            if runs_inline(self.recent_pass_s, self._inline_limit_s):
                done: Future[list[dict[str, Tensor] | BaseException]] = Future()
                done.set_result(self._execute(batch))
                # Through the loop, not a direct call: I/O and other callbacks get their
                # turn between two inline batches, and plans do not recurse.
                loop.call_soon(self._finished, batch, done)
            elif self._executor is None:
                pending = loop.run_in_executor(None, self._execute, batch)
                pending.add_done_callback(lambda done: self._finished(batch, done))
            else:
                submitted = self._executor.submit(self._execute, batch)
                # One hop back to the loop; asyncio.wrap_future would take two.
                submitted.add_done_callback(
                    lambda done: _call_soon_threadsafe(loop, self._finished, batch, done)
                )
        except Exception as exc:  # e.g. the executor is shut down: fail these, go on
            self._running -= 1
            _settle(batch, [exc] * len(batch))

    def _finished(
        self,
        batch: Sequence[_Pending],
        done: Future[list[dict[str, Tensor] | BaseException]]
        | asyncio.Future[list[dict[str, Tensor] | BaseException]],
    ) -> None:
        self._running -= 1
        try:
            # The next batch first: the instance must not wait while these are answered.
            self._plan()
        finally:
            if done.cancelled():  # the executor shut down with the batch queued in it
                for p in batch:
                    p.future.cancel()
            else:
                error = done.exception()
                _settle(batch, [error] * len(batch) if error is not None else done.result())

    def _execute(self, batch: Sequence[_Pending]) -> list[dict[str, Tensor] | BaseException]:
        """Runs on an executor thread: one forward pass, or one per request on failure."""
        try:
            return list(self._forward(batch))
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
        # The batch failed: find the culprit(s) by running each request alone.
        results: list[dict[str, Tensor] | BaseException] = []
        for p in batch:
            try:
                results.extend(self._forward([p]))
            except Exception as exc:
                results.append(exc)
        return results

    def _forward(self, batch: Sequence[_Pending]) -> list[dict[str, Tensor]]:
        model = self.model
        batched = model.signature.max_batch_size > 0
        t0 = time.perf_counter_ns()
        if len(batch) == 1:
            merged = dict(batch[0].inputs)
        else:
            merged = {n: _concat([p.inputs[n] for p in batch]) for n in batch[0].inputs}
        total = sum(p.size for p in batch)
        t1 = time.perf_counter_ns()
        outputs = model.run(merged, total if batched else None)
        t2 = time.perf_counter_ns()
        if len(batch) == 1:
            results = [outputs]
        else:
            sizes = [p.size for p in batch]
            pieces = {n: _split(n, v, sizes) for n, v in outputs.items()}
            results = [{n: parts[i] for n, parts in pieces.items()} for i in range(len(batch))]
        t3 = time.perf_counter_ns()
        self.executions += 1
        self.recent_pass_s = recent_average(self.recent_pass_s, (t3 - t0) / 1e9)
        self._stats.record_execution(
            model.name,
            model.version,
            batch_size=total,
            requests=len(batch),
            input_ns=t1 - t0,
            infer_ns=t2 - t1,
            output_ns=t3 - t2,
        )
        return results
