"""The relay's deadline queue: one loop timer serving many call deadlines."""

from __future__ import annotations

import asyncio

from mesh.proxy.deadlines import DeadlineQueue


async def test_deadlines_fire_in_order_and_not_before_their_time() -> None:
    loop = asyncio.get_running_loop()
    queue = DeadlineQueue(loop)
    fired: list[tuple[str, float]] = []
    done = loop.create_future()
    start = loop.time()

    def note(name: str) -> None:
        fired.append((name, loop.time() - start))
        if len(fired) == 3:
            done.set_result(None)

    # Armed out of order: a later-armed earlier deadline takes the loop's timer.
    queue.call_later(0.06, lambda: note("c"))
    queue.call_later(0.02, lambda: note("a"))
    queue.call_later(0.04, lambda: note("b"))
    await asyncio.wait_for(done, 5)
    assert [name for name, _ in fired] == ["a", "b", "c"]
    for (_, at), due in zip(fired, (0.02, 0.04, 0.06), strict=True):
        assert at >= due - 0.001
    assert len(queue) == 0


async def test_a_cancelled_deadline_never_fires_and_frees_its_callback() -> None:
    loop = asyncio.get_running_loop()
    queue = DeadlineQueue(loop)
    fired: list[str] = []
    done = loop.create_future()
    first = queue.call_later(0.01, lambda: fired.append("cancelled"))
    queue.call_later(0.03, lambda: done.set_result(None))
    first.cancel()
    first.cancel()  # twice is once
    assert first.callback is None
    assert len(queue) == 1
    await asyncio.wait_for(done, 5)
    assert fired == []
    assert len(queue) == 0


async def test_many_cancelled_deadlines_are_compacted_and_live_ones_kept() -> None:
    loop = asyncio.get_running_loop()
    queue = DeadlineQueue(loop)
    done = loop.create_future()
    # What a relay does: each call arms a far deadline and finishes long before it.
    for _ in range(1000):
        queue.call_later(60.0, lambda: None).cancel()
    live = queue.call_later(0.01, lambda: done.set_result("live"))
    assert len(queue) == 1
    assert len(queue._heap) < 200  # compacted as it went, not 1,001 entries
    assert await asyncio.wait_for(done, 5) == "live"
    assert live.callback is None


async def test_a_failing_callback_does_not_stop_the_others() -> None:
    loop = asyncio.get_running_loop()
    queue = DeadlineQueue(loop)
    done = loop.create_future()

    def fail() -> None:
        raise RuntimeError("boom")

    queue.call_later(0.01, fail)
    queue.call_later(0.01, lambda: done.set_result("after"))
    assert await asyncio.wait_for(done, 5) == "after"


async def test_close_forgets_every_deadline() -> None:
    loop = asyncio.get_running_loop()
    queue = DeadlineQueue(loop)
    fired: list[int] = []
    queue.call_later(0.01, lambda: fired.append(1))
    queue.close()
    assert len(queue) == 0
    done = loop.create_future()
    loop.call_later(0.05, done.set_result, None)
    await done
    assert fired == []
