"""Runs one job in its own OS process (and, for world_size > 1, one process per rank).

The worker starts ``job_main`` with multiprocessing's spawn context; world_size > 1
launches ranks with ``torch.multiprocessing.spawn`` and ``torch.distributed``
(gloo on the CPU, NCCL on GPUs). Progress travels back over a one-way pipe as
small dicts; ``JobProcess`` turns that into an async iterator for the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import traceback
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
from torch.multiprocessing.spawn import ProcessExitedException

from workers.training.batches import StalledStream
from workers.training.failures import os_failure
from workers.training.loop import RunConfig, TrainingFailed, train

#: How long ranks wait for each other before a collective fails the job.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def _die_with_parent() -> None:
    """Exits this process when its parent dies, so a SIGKILLed worker leaves no trainers."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: Exit status of a process that died of a transient cause; the worker retries it.
EXIT_RETRY = 75  # EX_TEMPFAIL


def _transient(exc: BaseException) -> bool:
    """The data service went away, or stopped answering: worth another attempt from the
    checkpoint."""
    if isinstance(exc, ProcessExitedException):  # a rank that exited for this reason
        return exc.exit_code == EXIT_RETRY
    if isinstance(exc, StalledStream):
        return True
    code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TrainingFailed):
        return str(exc)
    if isinstance(exc, OSError):  # its str names the worker's paths; the log keeps them
        return f"storage failed: {os_failure(exc)}"
    return f"{type(exc).__name__}: {exc}"


def _rank_main(index: int, config: RunConfig, conn: Any, port: int) -> None:
    """Entry of the ``index``-th local rank under torch.multiprocessing.spawn."""
    import torch.distributed as dist

    _die_with_parent()
    rank = config.ranks[index] if config.ranks is not None else index
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=config.init_method or f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=config.plan.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        if config.init_method is not None:
            # The other nodes' ranks learn the job from rank 0 (workers.training.follower).
            dist.broadcast_object_list([config], src=0)
        train(config, rank, conn.send)
        if config.init_method is not None:
            # Every node leaves together once rank 0 has exported: a follower's next
            # rendezvous must not find this job's store still open.
            dist.barrier()
    except BaseException as exc:
        if _transient(exc):
            os._exit(EXIT_RETRY)  # the launcher sees the code and exits with it in turn
        conn.send({"type": "failed", "reason": f"rank {rank}: {_reason(exc)}"})
        raise
    finally:
        dist.destroy_process_group()


def job_main(config: RunConfig, conn: Any) -> None:
    """Entry of the job process: trains in place, or launches the ranks and waits."""
    _die_with_parent()
    try:
        if config.plan.world_size == 1 and config.init_method is None:
            train(config, 0, conn.send)
        else:
            from torch.multiprocessing.spawn import spawn

            spawn(  # type: ignore[no-untyped-call]
                _rank_main,
                args=(config, conn, _free_port()),
                nprocs=len(config.ranks) if config.ranks is not None else config.plan.world_size,
                join=True,
            )
    except BaseException as exc:
        if _transient(exc):
            conn.close()
            os._exit(EXIT_RETRY)  # no "failed" report: the worker restarts from the checkpoint
        conn.send({"type": "failed", "reason": _reason(exc), "traceback": traceback.format_exc()})
        conn.close()
        os._exit(1)
    conn.close()


class JobProcess:
    """A started job process: its messages as an async iterator, then its exit code."""

    def __init__(self, config: RunConfig) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._reader, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=job_main, args=(config, writer), name=f"train-{config.job_id}"
        )
        self.process.start()
        # Our copy of the write end must go, or the reader never sees EOF.
        writer.close()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        threading.Thread(target=self._pump, name=f"pipe-{config.job_id}", daemon=True).start()

    def _pump(self) -> None:
        try:
            while True:
                try:
                    message = self._reader.recv()
                except (EOFError, OSError):
                    break
                self._deliver(message)
        finally:
            self._reader.close()
            self.process.join()
            self._deliver(None)

    def _deliver(self, message: dict[str, Any] | None) -> None:
        # A closed loop means the worker is shutting down and no longer listening.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            message = await self._queue.get()
            if message is None:
                return
            yield message

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        """SIGTERM the job process; its ranks follow it through their parent watch."""
        if self.process.is_alive():
            self.process.terminate()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
