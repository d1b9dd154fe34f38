"""Batched writes: every connection's frames from one pass over the input, written once.

Why: on a proxied unary call the syscalls, not the framing, are what cost. A connection
appends the frames it produces to its own buffer and marks itself dirty here; the pass
over the input that produced them (``Connection.data_received``) flushes every dirty
connection once at its end, so a call relayed from one connection to another costs one
write on each. Writes made outside an input pass (timers, tasks) have no pass to end: a
flush is scheduled on the loop for them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.proxy.connection import Connection


class Flusher:
    """Writes every connection's batched frames once per pass over the input."""

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._scheduled = False
        #: Input passes under way: each flushes when it ends, so nothing is scheduled.
        self.passes = 0

    def mark(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._scheduled and not self.passes:
            # Writes from timers and tasks have no input pass to end: flush them soon.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush_output()
