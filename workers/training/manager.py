"""The job lifecycle: submit, queue, run in a process, persist events, resume, cancel, publish."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from mesh.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from registry.connect import backoff_delays
from workers.model_repo import ModelRepo, RepositoryError
from workers.training import spec as specs
from workers.training.checkpoint import JobArtifacts
from workers.training.datasets import Datasets
from workers.training.failures import job_failure, publication_failure
from workers.training.jobstore import JobStore
from workers.training.loop import RunConfig
from workers.training.nodes import NodeGroup
from workers.training.ownership import JobClaims, OwnershipLost, SoleOwner
from workers.training.process import JobProcess
from workers.training.publish import (
    LineageOnly,
    VersionRecorder,
    check_compatible,
    lineage,
    publish,
)

log = logging.getLogger(__name__)

#: First wait before retrying a crashed process or an unavailable data service; doubles.
RETRY_BACKOFF_SECONDS = 1.0
#: How long a job's event or state waits for an unreachable job store (``up`` restarts its
#: store in seconds) before the job fails; retried after 0.1 s, doubling up to 2 s.
STORE_OUTAGE_SECONDS = 60.0
TERMINAL = {
    training_pb2.JOB_STATE_SUCCEEDED,
    training_pb2.JOB_STATE_FAILED,
    training_pb2.JOB_STATE_CANCELLED,
}


@dataclass(frozen=True)
class WorkerSettings:
    """Where a training worker keeps things and how much it runs at once."""

    artifacts_url: str
    model_repo_url: str
    data_address: str
    device: str = "cpu"
    max_concurrent_jobs: int = 1
    #: Process starts per job before a repeatedly crashing job is FAILED.
    max_attempts: int = 3
    #: Seconds a cancelled job's process gets to exit on SIGTERM before SIGKILL.
    cancel_grace_seconds: float = 5.0
    #: CPU threads per training rank; 0 divides the machine's cores among the ranks.
    threads_per_rank: int = 0
    #: Node 0 of a group of training nodes on several hosts (workers.training.nodes): jobs
    #: of the group's world size run ranks on every node. None: every job on this host.
    node_group: NodeGroup | None = None
    #: Seconds between looks for unclaimed unfinished jobs in a shared store (adoption).
    adopt_interval_seconds: float = 2.0
    #: Seconds between re-reads of a watched job that another worker runs.
    watch_poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.device not in specs.DEVICES:
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.max_concurrent_jobs < 1:
            raise ValueError(f"max_concurrent_jobs must be >= 1, got {self.max_concurrent_jobs}")
        if self.threads_per_rank < 0:
            raise ValueError(f"threads_per_rank must be >= 0, got {self.threads_per_rank}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.adopt_interval_seconds <= 0 or self.watch_poll_seconds <= 0:
            raise ValueError("adopt and watch poll intervals must be positive")


@dataclass
class _Run:
    """What the worker holds for a job that is queued or running here."""

    job: training_pb2.Job
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    process: JobProcess | None = None
    cancelled: bool = False
    #: Set by a cancel, to cut short a wait between retries.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str = ""
    result: dict[str, Any] | None = None
    #: Monotonic time by which the job's claim must be renewed, or the job is given up.
    lease_deadline: float = float("inf")
    #: The job as last saved to the store. ``job`` runs ahead of it while an event
    #: is being appended, so reads serve this: a client that sees FAILED from
    #: GetJob then finds the job in ListJobs(state=FAILED) and in WatchJob.
    saved: bytes = b""

    def __post_init__(self) -> None:
        self.saved = self.job.SerializeToString()

    def reset(self) -> None:
        """Forgets the outcome of a previous process before starting another."""
        self.failure, self.result = "", None


def catch_up(job: training_pb2.Job, events: list[training_pb2.JobEvent]) -> None:
    """Applies events the stored job does not reflect yet (appended, job not saved)."""
    for event in events:
        job.last_event = max(job.last_event, event.sequence)
        kind = event.WhichOneof("kind")
        if kind == "step_loss":
            job.step = max(job.step, event.step_loss.step)
        elif kind == "epoch_metrics":
            job.epoch = max(job.epoch, event.epoch_metrics.epoch)
            job.step = max(job.step, event.epoch_metrics.step)
            job.metrics.update(event.epoch_metrics.metrics)
        elif kind == "state_changed":
            job.state = event.state_changed.state
            job.message = event.state_changed.message
        elif kind == "published":
            job.published.CopyFrom(event.published)


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class JobManager:
    """Owns every job of one worker. Training itself happens in child processes."""

    def __init__(
        self,
        settings: WorkerSettings,
        store: JobStore,
        datasets: Datasets,
        recorder: VersionRecorder | None = None,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] | None = None,
        claims: JobClaims | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        #: Who runs which job; the local store has one worker, so it is always this one.
        self.claims: JobClaims = claims or SoleOwner()
        self.datasets = datasets
        self.recorder: VersionRecorder = recorder or LineageOnly()
        self.repo = ModelRepo(settings.model_repo_url)
        self._clock = clock
        self._new_id = new_id or self._default_id
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        self._runs: dict[str, _Run] = {}
        self._signals: dict[str, asyncio.Event] = {}
        self._closing = False
        self._loops: list[asyncio.Task[None]] = []

    @staticmethod
    def _default_id() -> str:
        return uuid.uuid4().hex[:16]

    # ---- events -----------------------------------------------------------------------

    async def _emit(self, run: _Run, job: training_pb2.Job | None = None, **kind: Any) -> None:
        """Appends an event (next sequence), persists the job, wakes the watchers.

        ``job``: a changed copy of ``run.job``, which takes its content only once it is
        stored, so GetJob (served from memory) never runs ahead of ListJobs (the store).
        """
        job = run.job if job is None else job
        event = training_pb2.JobEvent(
            sequence=job.last_event + 1, time=_timestamp(self._clock()), **kind
        )
        await self._stored(lambda: self.store.append_event(job.id, event))
        job.last_event = event.sequence
        await self._stored(lambda: self.store.put(job))
        if job is not run.job:
            run.job.CopyFrom(job)
        run.saved = job.SerializeToString()
        self._notify(job.id)

    async def _stored(self, write: Callable[[], Awaitable[None]]) -> None:
        """A job-store write, waiting out a store that is briefly unreachable: a job must
        not fail because the store restarted (its training process keeps going; its
        reports wait in the pipe meanwhile)."""
        deadline = time.monotonic() + STORE_OUTAGE_SECONDS
        for delay in backoff_delays(0.1, 2.0, 2.0):
            try:
                await write()
                return
            except Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s; retrying in %.1f s", exc.message, delay)
            await asyncio.sleep(delay)

    def _notify(self, job_id: str) -> None:
        signal = self._signals.pop(job_id, None)
        if signal is not None:
            signal.set()

    async def _set_state(self, run: _Run, state: int, message: str = "") -> None:
        job = training_pb2.Job()
        job.CopyFrom(run.job)
        job.state = state  # type: ignore[assignment]
        job.message = message
        now = _timestamp(self._clock())
        if state == training_pb2.JOB_STATE_RUNNING and not job.HasField("started_at"):
            job.started_at.CopyFrom(now)
        if state in TERMINAL:
            job.finished_at.CopyFrom(now)
        await self._emit(
            run,
            job,
            state_changed=training_pb2.StateChanged(state=state, message=message),  # type: ignore[arg-type]
        )

    # ---- RPC-facing operations ----------------------------------------------------------

    async def submit(self, spec: training_pb2.JobSpec) -> training_pb2.Job:
        specs.validate_spec(spec)
        dataset = await self.datasets.get(spec.dataset.name, spec.dataset.version)
        sig = specs.validate_against(spec, dataset)
        await asyncio.to_thread(check_compatible, self.repo, spec.model_name, sig)
        if (spec.device or self.settings.device) == "cuda" and self.settings.device != "cuda":
            raise FailedPrecondition("device: this training worker has no CUDA device")
        plan = specs.plan(spec, dataset)
        job = training_pb2.Job(id=self._new_id(), spec=spec, total_steps=plan.total_steps)
        # Pin "latest" to the version resolved now, so a resumed job reads the same data.
        job.spec.dataset.version = dataset.version
        job.created_at.CopyFrom(_timestamp(self._clock()))
        # Claimed before it is stored: no other worker may adopt it meanwhile.
        if not await self.claims.claim(job.id):
            raise Aborted(f"job id {job.id} is claimed by another worker; submit again")
        run = _Run(job, lease_deadline=self._lease_deadline())
        self._runs[job.id] = run
        async with run.lock:
            await self._set_state(run, training_pb2.JOB_STATE_QUEUED)
        run.task = asyncio.create_task(self._run(run), name=f"job-{job.id}")
        return training_pb2.Job.FromString(job.SerializeToString())

    async def get(self, job_id: str) -> training_pb2.Job:
        run = self._runs.get(job_id)
        if run is not None:
            return training_pb2.Job.FromString(run.saved)
        job = await self.store.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    async def list(self, state: int = 0, model_name: str = "") -> builtins.list[training_pb2.Job]:
        jobs = await self.store.list()
        return [
            j
            for j in jobs
            if (not state or j.state == state)
            and (not model_name or j.spec.model_name == model_name)
        ]

    async def cancel(self, job_id: str) -> training_pb2.Job:
        run = self._runs.get(job_id)
        if run is None or run.job.state in TERMINAL:
            job = await self.get(job_id)
            if job.state not in TERMINAL and self.claims.shared:
                # Its process and checkpoints belong to the worker that holds its claim.
                raise FailedPrecondition(
                    f"job {job_id} is run by another training worker; cancel it there"
                )
            return job
        async with run.lock:
            if run.job.state in TERMINAL:
                return await self.get(job_id)
            run.cancelled = True
            run.wake.set()
            if run.process is None:
                # Not started yet: it never will be.
                if run.task is not None:
                    run.task.cancel()
                await self._finish_cancelled(run)
                return await self.get(job_id)
            run.process.terminate()
        task = run.task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.settings.cancel_grace_seconds)
            except TimeoutError:
                if run.process is not None:
                    run.process.kill()
                await asyncio.shield(task)
        return await self.get(job_id)

    def pid(self, job_id: str) -> int | None:
        """The id of the job's training process while it runs here, for operators and tests."""
        run = self._runs.get(job_id)
        if run is None or run.process is None or run.process.exitcode is not None:
            return None
        return run.process.process.pid

    async def watch(self, job_id: str, from_event: int) -> AsyncIterator[training_pb2.JobEvent]:
        """Events from ``from_event`` on, live, until the job is final and all are sent."""
        if from_event < 0:
            raise InvalidArgument(f"from_event: must be >= 0, got {from_event}")
        await self.get(job_id)  # NotFound for unknown ids
        next_event = max(1, from_event)
        while True:
            # Take the signal before reading, so an event appended meanwhile still wakes us.
            signal = self._signals.setdefault(job_id, asyncio.Event())
            for event in await self.store.events(job_id, next_event):
                if event.sequence < next_event:
                    continue
                yield event
                next_event = event.sequence + 1
            # The stored job, not the live one: it is saved only after its event is
            # appended, so a final state there means the final event is readable.
            job = await self.store.get(job_id)
            if job is None or (job.state in TERMINAL and next_event > job.last_event):
                return
            if job_id in self._runs:
                await signal.wait()
            else:
                # Run by another worker (shared store): its events arrive only by re-reading.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signal.wait(), self.settings.watch_poll_seconds)

    # ---- lifecycle ------------------------------------------------------------------------

    def _lease_deadline(self) -> float:
        return time.monotonic() + self.claims.ttl_seconds

    async def recover(self) -> int:
        """Adopts the store's unfinished jobs that no live worker holds; returns how many.

        With a shared store it also starts keeping this worker's claims renewed and
        looking for orphaned jobs every ``adopt_interval_seconds``.
        """
        adopted = await self._adopt()
        if self.claims.shared and not self._loops:
            self._loops = [
                asyncio.create_task(self._keep_claims(), name="keep-job-claims"),
                asyncio.create_task(self._adopt_orphans(), name="adopt-jobs"),
            ]
        return adopted

    async def _adopt(self) -> int:
        """Claims and resumes unfinished jobs (oldest first) that no live worker holds."""
        adopted = 0
        for stale in await self.store.unfinished():
            if stale.id in self._runs or self._closing:
                continue
            # In a shared store take only what we can start now; leave the rest to others.
            if self.claims.shared and len(self._runs) >= self.settings.max_concurrent_jobs:
                break
            if not await self.claims.claim(stale.id):
                continue  # a live worker runs it
            # Re-read under the claim: its previous owner may have written since the listing.
            job = await self.store.get(stale.id) or stale
            # The worker may have died between appending an event and saving the job.
            catch_up(job, await self.store.events(job.id, job.last_event + 1))
            if job.state in TERMINAL:
                await self.store.put(job)
                await self.claims.release(job.id)
                continue
            if job.state == training_pb2.JOB_STATE_RUNNING:
                job.attempts += 1
            run = _Run(job, lease_deadline=self._lease_deadline())
            self._runs[job.id] = run
            run.task = asyncio.create_task(self._run(run), name=f"job-{job.id}")
            adopted += 1
            log.info("adopted job %s at step %d", job.id, job.step)
        return adopted

    async def _adopt_orphans(self) -> None:
        while True:
            await asyncio.sleep(self.settings.adopt_interval_seconds)
            try:
                await self._adopt()
            except Exception as exc:  # the store may be briefly away: try next round
                log.warning("looking for jobs to adopt failed: %s", exc)

    async def _keep_claims(self) -> None:
        """Renews the claim of every job held here; gives up a job whose claim is lost."""
        interval = self.claims.ttl_seconds / 3
        while True:
            await asyncio.sleep(interval)
            for run in list(self._runs.values()):
                if run.job.state in TERMINAL:
                    continue
                try:
                    held = await self.claims.renew(run.job.id)
                except Exception as exc:
                    log.warning("renewing the claim of job %s failed: %s", run.job.id, exc)
                    # Unconfirmed: keep going only while the last renewal still holds.
                    held = time.monotonic() < run.lease_deadline
                else:
                    if held:
                        run.lease_deadline = self._lease_deadline()
                if not held:
                    await self._abandon(run)

    async def _abandon(self, run: _Run) -> None:
        """Stops a job whose claim this worker lost, writing nothing: its new owner resumes it."""
        log.warning("lost the claim of job %s: stopping it here", run.job.id)
        if self._runs.get(run.job.id) is run:
            del self._runs[run.job.id]
        if run.process is not None:
            run.process.kill()
        if run.task is not None and run.task is not asyncio.current_task():
            run.task.cancel()
            await asyncio.gather(run.task, return_exceptions=True)
        self._notify(run.job.id)

    async def _confirm(self, run: _Run) -> None:
        """Fences a final write (publish, finish): raises unless the claim is still ours."""
        if not await self.claims.renew(run.job.id):
            raise OwnershipLost(f"job {run.job.id}: another worker holds its claim now")

    async def close(self) -> None:
        """Stops every training process; unfinished jobs stay RUNNING/QUEUED and resume later."""
        self._closing = True
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        runs = list(self._runs.values())
        for run in runs:
            if run.process is not None:
                run.process.terminate()
        tasks = [r.task for r in runs if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            if run.process is not None:
                run.process.kill()
        # Unfinished jobs stay in the store; free their claims so that another worker (or
        # this one, restarted) resumes them at once rather than after the claim lapses.
        for run in runs:
            if run.job.state not in TERMINAL:
                try:
                    await self.claims.release(run.job.id)
                except Exception as exc:
                    log.warning(
                        "could not release job %s (its claim will lapse): %s", run.job.id, exc
                    )

    # ---- running ----------------------------------------------------------------------

    async def _run(self, run: _Run) -> None:
        try:
            async with self._slots:
                await self._train(run)
        except asyncio.CancelledError:
            raise
        except OwnershipLost as exc:
            log.warning("%s; leaving it to that worker", exc)
            if run.process is not None:
                run.process.kill()
            self._runs.pop(run.job.id, None)
        except Exception as exc:  # never let one job's bookkeeping bug go unrecorded
            log.exception("job %s failed in the worker", run.job.id)
            async with run.lock:
                if run.job.state not in TERMINAL:
                    try:
                        await self._finish(run, training_pb2.JOB_STATE_FAILED, job_failure(exc))
                    except OwnershipLost:
                        self._runs.pop(run.job.id, None)
        finally:
            if run.job.state in TERMINAL:
                # Finished jobs are served from the store; keep memory for live ones.
                self._runs.pop(run.job.id, None)
                try:
                    await self.claims.release(run.job.id)
                except Exception as exc:  # it lapses on its own; a final job is never adopted
                    log.warning("could not release the claim of job %s: %s", run.job.id, exc)

    async def _dataset(self, run: _Run) -> data_pb2.Dataset:
        """The job's dataset, waiting out a data service that is briefly unavailable."""
        spec = run.job.spec
        for attempt in range(self.settings.max_attempts):
            try:
                return await self.datasets.get(spec.dataset.name, spec.dataset.version)
            except Unavailable:
                if attempt + 1 == self.settings.max_attempts:
                    raise
                await self._backoff(run, attempt)
        raise AssertionError("unreachable")

    async def _backoff(self, run: _Run, attempt: int) -> None:
        """Waits before a retry; a cancel ends the wait at once."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.wake.wait(), RETRY_BACKOFF_SECONDS * 2**attempt)

    async def _train(self, run: _Run) -> None:
        job = run.job
        spec = job.spec
        dataset = await self._dataset(run)
        plan = specs.plan(spec, dataset)
        config = RunConfig(
            job_id=job.id,
            spec=spec.SerializeToString(),
            dataset=dataset.SerializeToString(),
            plan=plan,
            data_address=self.settings.data_address,
            artifacts_url=self.settings.artifacts_url,
            device=spec.device or self.settings.device,
            threads=self.settings.threads_per_rank,
        )
        group = self.settings.node_group
        if group is not None and plan.world_size == group.world_size:
            # Spans the node group: this node runs its ranks, the followers theirs.
            config = replace(config, init_method=group.init_method, ranks=group.ranks)
        crashes = 0
        while True:
            async with run.lock:
                if await self._stopped(run):
                    return
                run.reset()
                run.process = JobProcess(config)
            async for message in run.process.messages():
                async with run.lock:
                    await self._on_message(run, message)
            exitcode = run.process.exitcode
            async with run.lock:
                if await self._stopped(run):
                    return
                if run.result is not None:
                    await self._publish(run, dataset)
                    return
                if run.failure:
                    await self._finish(run, training_pb2.JOB_STATE_FAILED, run.failure)
                    return
                # Died without saying why (killed, out of memory, data service gone):
                # start again from the last checkpoint, a bounded number of times.
                crashes += 1
                job.attempts += 1
                reason = f"training process exited with code {exitcode}"
                if crashes >= self.settings.max_attempts:
                    await self._finish(
                        run,
                        training_pb2.JOB_STATE_FAILED,
                        f"{reason}; gave up after {crashes} attempts",
                    )
                    return
                await self._set_state(
                    run, training_pb2.JOB_STATE_RUNNING, f"{reason}; restarting from checkpoint"
                )
            await self._backoff(run, crashes - 1)

    def _is_closing(self) -> bool:
        # Methods, not attribute tests: mypy would narrow the flags across awaits.
        return self._closing

    async def _stopped(self, run: _Run) -> bool:
        """Under ``run.lock``: whether the run must not go on (the manager is closing, or
        the job was cancelled, which this records)."""
        if self._is_closing():
            return True
        if self._was_cancelled(run):
            await self._finish_cancelled(run)
            return True
        return False

    def _was_cancelled(self, run: _Run) -> bool:
        return run.cancelled

    async def _on_message(self, run: _Run, message: dict[str, Any]) -> None:
        job = run.job
        kind = message.get("type")
        if kind == "started":
            resumed = int(message["resumed_from"])
            note = f"resumed from checkpoint at step {resumed}" if resumed >= 0 else ""
            if job.state != training_pb2.JOB_STATE_RUNNING or note:
                await self._set_state(run, training_pb2.JOB_STATE_RUNNING, note)
        elif kind == "step":
            step = int(message["step"])
            if step <= job.step:
                return  # replaying steps trained before a crash: report each step once
            job.step = step
            job.metrics["examples_per_second"] = float(message["examples_per_second"])
            await self._emit(
                run,
                step_loss=training_pb2.StepLoss(
                    step=step,
                    epoch=int(message["epoch"]),
                    loss=float(message["loss"]),
                    learning_rate=float(message["learning_rate"]),
                    examples_per_second=float(message["examples_per_second"]),
                    eta_seconds=float(message["eta_seconds"]),
                ),
            )
        elif kind == "checkpoint":
            await self._emit(
                run,
                checkpoint=training_pb2.CheckpointSaved(
                    step=int(message["step"]), uri=str(message["uri"])
                ),
            )
        elif kind == "epoch":
            job.epoch = int(message["epoch"])
            job.step = max(job.step, int(message["step"]))
            job.metrics.update(message["metrics"])
            await self._emit(
                run,
                epoch_metrics=training_pb2.EpochMetrics(
                    epoch=job.epoch, step=int(message["step"]), metrics=message["metrics"]
                ),
            )
        elif kind == "done":
            job.step = int(message["step"])
            job.metrics.update(message["metrics"])
            run.result = message
        elif kind == "failed":
            if not run.failure:  # the first rank to fail says why
                run.failure = str(message["reason"])
                if message.get("traceback"):
                    log.warning("job %s failed:\n%s", job.id, message["traceback"])
        else:
            log.warning("job %s: unknown message %r", job.id, kind)

    async def _publish(self, run: _Run, dataset: data_pb2.Dataset) -> None:
        await self._confirm(run)
        job = run.job
        artifacts = JobArtifacts(self.settings.artifacts_url, job.id)
        metrics = dict(job.metrics)

        record = lineage(job, dataset, metrics)

        def write() -> training_pb2.PublishedVersion:
            return publish(self.repo, job, dataset, artifacts.read_export(), record)

        try:
            published = await asyncio.to_thread(write)
        except (OSError, RepositoryError) as exc:
            # The client learns the kind of failure; the paths stay in this log.
            log.exception("job %s: publishing failed", job.id)
            message = publication_failure(job.spec.model_name, exc)
            await self._finish(run, training_pb2.JOB_STATE_FAILED, message)
            return
        job.published.CopyFrom(published)
        await self.recorder.record(
            published.model_name, int(published.version), published.uri, record
        )
        await self._emit(run, published=published)
        await self._finish(run, training_pb2.JOB_STATE_SUCCEEDED)

    async def _finish_cancelled(self, run: _Run) -> None:
        await self._finish(run, training_pb2.JOB_STATE_CANCELLED, "cancelled by request")

    async def _finish(self, run: _Run, state: int, message: str = "") -> None:
        # Removing the artifacts of a job another worker resumed would wreck its run.
        await self._confirm(run)
        artifacts = JobArtifacts(self.settings.artifacts_url, run.job.id)
        await asyncio.to_thread(artifacts.remove)
        await self._set_state(run, state, message)
