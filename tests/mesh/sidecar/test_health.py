"""HealthMirror against a real server: Watch through the shared interceptors, loss, recovery."""

from __future__ import annotations

import asyncio
import signal

import grpc.aio
import pytest

from mesh.server.app import ServerSettings, start_server
from mesh.sidecar.health import HealthMirror
from mesh.sidecar.liveness import Hung, Liveness
from tests.support.processes import Launched


async def test_mirror_follows_watch_and_treats_a_lost_worker_as_not_serving() -> None:
    seen: list[bool] = []
    changed = asyncio.Event()

    async def record(serving: bool) -> None:
        seen.append(serving)
        changed.set()

    async def next_change() -> bool:
        await asyncio.wait_for(changed.wait(), timeout=10)
        changed.clear()
        return seen[-1]

    worker = await start_server(ServerSettings(), [])
    channel = grpc.aio.insecure_channel(worker.address)
    task = asyncio.create_task(HealthMirror(channel, record, retry=0.05).run())
    try:
        assert await next_change() is True
        await worker.set_serving(False)
        assert await next_change() is False
        await worker.set_serving(True)
        assert await next_change() is True
        await worker.drain(grace=0)
        assert await next_change() is False
        assert seen == [True, False, True, False]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()
        await worker.drain(grace=0)


async def test_a_hung_worker_is_not_serving_until_it_answers_again() -> None:
    """SIGSTOP keeps the worker's connection and Watch stream open, so only a missed Check
    deadline shows the hang; SIGCONT brings it back."""
    seen: list[bool] = []
    changed = asyncio.Event()

    async def record(serving: bool) -> None:
        seen.append(serving)
        changed.set()

    async def next_change(timeout: float) -> bool:
        await asyncio.wait_for(changed.wait(), timeout=timeout)
        changed.clear()
        return seen[-1]

    worker = Launched("tests.support.bare_server")
    try:
        address = await asyncio.to_thread(worker.address)
        channel = grpc.aio.insecure_channel(address)
        mirror = HealthMirror(
            channel, record, probe_interval=0.2, probe_timeout=0.5, probe_failures=2
        )
        task = asyncio.create_task(mirror.run())
        try:
            assert await next_change(10) is True
            worker.kill(signal.SIGSTOP)
            # Two missed 0.5 s deadlines, 0.2 s apart, and a margin for a loaded machine.
            assert await next_change(10) is False
            worker.kill(signal.SIGCONT)
            assert await next_change(10) is True
            assert seen == [True, False, True]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close()
    finally:
        worker.kill(signal.SIGCONT)
        worker.stop()


async def test_a_worker_hung_for_the_liveness_window_is_given_up_on_once() -> None:
    """After NOT_SERVING (readiness), a silence as long as the window is reported, once."""
    seen: list[bool] = []
    hangs: list[Hung] = []
    hung = asyncio.Event()

    async def record(serving: bool) -> None:
        seen.append(serving)

    async def give_up(hang: Hung) -> None:
        hangs.append(hang)
        hung.set()

    worker = Launched("tests.support.bare_server")
    try:
        address = await asyncio.to_thread(worker.address)
        channel = grpc.aio.insecure_channel(address)
        mirror = HealthMirror(
            channel,
            record,
            probe_interval=0.2,
            probe_timeout=0.5,
            liveness=Liveness(1.5),
            on_hung=give_up,
        )
        task = asyncio.create_task(mirror.run())
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while seen != [True]:
                assert loop.time() < deadline, seen
                await asyncio.sleep(0.05)
            # Answering, it is never given up on.
            await asyncio.sleep(2.0)
            assert not hangs
            worker.kill(signal.SIGSTOP)
            await asyncio.wait_for(hung.wait(), timeout=15)
            assert seen == [True, False]
            (hang,) = hangs
            assert hang.silent_s >= 1.5 and hang.missed >= 2
            # Still hung, it is not reported again (the unit is already killing it).
            await asyncio.sleep(1.5)
            assert len(hangs) == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close()
    finally:
        worker.kill(signal.SIGCONT)
        worker.stop()


async def test_probe_settings_are_checked() -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")

    async def record(serving: bool) -> None:
        pass

    with pytest.raises(ValueError, match="probe_failures"):
        HealthMirror(channel, record, probe_failures=0)
    with pytest.raises(ValueError, match="go together"):
        HealthMirror(channel, record, liveness=Liveness(4.0))
    await channel.close()
