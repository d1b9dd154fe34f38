"""Runs ``registry.directory.run_janitor`` beside ``up``: dead processes' documents get swept.

A thread with its own event loop, so the supervisor loop stays synchronous. The store may be
down (restarting) at any moment: the connection is retried, and ``run_janitor`` itself logs
and survives a failed sweep. Several janitors may run at once (delete_by_query is
idempotent), so ``up`` against a shared ``--es`` needs no election.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from datetime import timedelta

from mesh.errors import Unavailable
from registry.connect import StoreSettings
from registry.directory import run_janitor
from registry.instances import utc_now
from registry.store import open_store

log = logging.getLogger(__name__)

#: Documents of instances whose lease ended longer ago than this are deleted.
RETENTION = timedelta(minutes=5)
#: Seconds between sweeps.
INTERVAL_S = 30.0
#: Seconds between attempts to reach a store that is down.
RECONNECT_S = 5.0


class Janitor:
    """``start()`` once; ``stop()`` cancels the sweep loop and joins the thread."""

    def __init__(
        self,
        settings: StoreSettings,
        *,
        retention: timedelta = RETENTION,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self._settings = settings
        self._retention = retention
        self._interval_s = interval_s
        self._loop = asyncio.new_event_loop()
        # Created now (the loop runs it later), so stop() can cancel it whenever it is called.
        self._task = self._loop.create_task(self._sweep_forever())
        self._thread = threading.Thread(target=self._run, name="janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                async with open_store(self._settings, deadline_s=RECONNECT_S) as store:
                    await run_janitor(
                        store.es,
                        store.indices,
                        utc_now,
                        retention=self._retention,
                        interval=self._interval_s,
                    )
            except Unavailable as exc:
                log.info("janitor: store unreachable (%s); retrying", exc)
            except Exception as exc:  # keep sweeping whatever one connection did
                log.warning("janitor: %s", exc)
            await asyncio.sleep(RECONNECT_S)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(timeout=10)
        else:
            self._task.cancel()
            self._loop.run_until_complete(asyncio.gather(self._task, return_exceptions=True))
            self._loop.close()
