"""A thread with its own event loop that works against the store beside ``up``.

The supervisor's loop stays synchronous. The store may be down (restarting) at any moment:
the connection is retried every ``reconnect_s``, and a failed pass is logged, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from mesh.errors import Unavailable
from registry.connect import StoreSettings
from registry.store import Store, open_store

log = logging.getLogger(__name__)


class StoreThread:
    """``start()`` once; ``stop()`` cancels the work and joins the thread. Subclasses
    define :meth:`work`, which runs on a connected store until it fails."""

    def __init__(self, settings: StoreSettings, *, name: str, reconnect_s: float) -> None:
        self._settings = settings
        self._name = name
        self._reconnect_s = reconnect_s
        self._loop = asyncio.new_event_loop()
        # Created now (the loop runs it later), so stop() can cancel it whenever it is called.
        self._task = self._loop.create_task(self._forever())
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    async def work(self, store: Store) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    async def _forever(self) -> None:
        while True:
            try:
                async with open_store(self._settings, deadline_s=self._reconnect_s) as store:
                    await self.work(store)
            except Unavailable as exc:
                log.info("%s: store unreachable (%s); retrying", self._name, exc)
            except Exception as exc:  # keep working whatever one connection did
                log.warning("%s: %s", self._name, exc)
            await asyncio.sleep(self._reconnect_s)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(timeout=10)
        else:
            self._task.cancel()
            self._loop.run_until_complete(asyncio.gather(self._task, return_exceptions=True))
            self._loop.close()
