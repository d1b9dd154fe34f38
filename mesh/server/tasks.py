"""Stopping a service's background tasks (watchers, followers) on drain or close."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancels every task first, so that none keeps working while another is awaited, then
    waits for each to finish; the list is emptied, so a second call is a no-op."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()
