"""Runs ``registry.directory.run_janitor`` beside ``up``: dead processes' documents get swept.

A thread with its own event loop, so the supervisor loop stays synchronous. The store may be
down (restarting) at any moment: the connection is retried, and ``run_janitor`` itself logs
and survives a failed sweep. Several janitors may run at once (delete_by_query is
idempotent), so ``up`` against a shared ``--es`` needs no election.
"""

from __future__ import annotations

from datetime import timedelta

from cli.supervision.store_thread import StoreThread
from registry.connect import StoreSettings
from registry.directory import run_janitor
from registry.instances import utc_now
from registry.store import Store

#: Documents of instances whose lease ended longer ago than this are deleted.
RETENTION = timedelta(minutes=5)
#: Seconds between sweeps.
INTERVAL_S = 30.0
#: Seconds between attempts to reach a store that is down.
RECONNECT_S = 5.0


class Janitor(StoreThread):
    """``start()`` once; ``stop()`` cancels the sweep loop and joins the thread."""

    def __init__(
        self,
        settings: StoreSettings,
        *,
        retention: timedelta = RETENTION,
        interval_s: float = INTERVAL_S,
    ) -> None:
        super().__init__(settings, name="janitor", reconnect_s=RECONNECT_S)
        self._retention = retention
        self._interval_s = interval_s

    async def work(self, store: Store) -> None:
        await run_janitor(
            store.es,
            store.indices,
            utc_now,
            retention=self._retention,
            interval=self._interval_s,
        )
