"""Gives memory freed after large messages back to the system (glibc's malloc keeps it).

A 250 MB request passes through grpc's threads in many slices; once the call ends, glibc
keeps the freed pages in its arenas (one per thread that allocated) instead of returning
them, so a sidecar or worker stayed hundreds of MB to GBs above its idle size after a
few large calls. Nothing on the Python side holds them: ``malloc_trim(0)`` brings the
process back to its idle size. A daemon thread checks how much free memory malloc holds
and trims when that passes a threshold; ctypes releases the GIL while glibc works.

Pure decision (``should_trim``) and a thin shell (``Trimmer``); elsewhere than glibc
(macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

log = logging.getLogger(__name__)

#: Free memory malloc may keep before it is trimmed: about a quarter of one default-sized
#: message (256 MiB); small enough that large messages never pile up, large enough that
#: ordinary traffic never triggers a trim.
DEFAULT_THRESHOLD_BYTES = 64 * 1024 * 1024
#: How often the free memory is checked (mallinfo2 walks the arenas' bins: cheap).
DEFAULT_INTERVAL_S = 1.0


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): size_t fields, so no overflow past 2 GiB."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@dataclass(frozen=True)
class Allocator:
    """The two glibc calls the trimmer needs."""

    free_bytes: Callable[[], int]
    trim: Callable[[], bool]


@cache
def glibc_allocator() -> Allocator | None:
    """glibc's ``mallinfo2``/``malloc_trim``; None where the C library is not glibc >= 2.33."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallinfo2 = libc.mallinfo2
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    mallinfo2.argtypes = []
    malloc_trim.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]

    def free_bytes() -> int:
        info = mallinfo2()
        # Free chunks in the arenas (fordblks) and fastbins (fsmblks): what a trim can return.
        return int(info.fordblks) + int(info.fsmblks)

    def trim() -> bool:
        return bool(malloc_trim(0))

    return Allocator(free_bytes, trim)


def should_trim(free_bytes: int, threshold_bytes: int) -> bool:
    """Trim once malloc keeps at least ``threshold_bytes`` of freed memory."""
    return free_bytes >= threshold_bytes


class Trimmer:
    """Checks the allocator every ``interval_s`` and trims past ``threshold_bytes``."""

    def __init__(
        self,
        allocator: Allocator,
        *,
        threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        if threshold_bytes <= 0 or interval_s <= 0:
            raise ValueError("threshold_bytes and interval_s must be positive")
        self.allocator = allocator
        self.threshold_bytes = threshold_bytes
        self.interval_s = interval_s
        self.trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshserve-trim", daemon=True)

    def check(self) -> bool:
        """One check; trims when due. Returns whether it trimmed."""
        free = self.allocator.free_bytes()
        if not should_trim(free, self.threshold_bytes):
            return False
        self.allocator.trim()
        self.trims += 1
        log.debug("returned up to %d MiB of freed heap to the system", free >> 20)
        return True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()


_lock = threading.Lock()
_process_trimmer: Trimmer | None = None


def _forget_in_child() -> None:
    """A forked child has no trimmer thread (nor a usable lock): its first server starts one."""
    global _lock, _process_trimmer
    _lock = threading.Lock()
    _process_trimmer = None


os.register_at_fork(after_in_child=_forget_in_child)


def return_freed_memory() -> Trimmer | None:
    """Starts this process's trimmer (once; every server start calls it). None off glibc."""
    global _process_trimmer
    with _lock:
        if _process_trimmer is None:
            allocator = glibc_allocator()
            if allocator is None:
                return None
            _process_trimmer = Trimmer(allocator)
            _process_trimmer.start()
        return _process_trimmer
