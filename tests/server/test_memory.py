"""The trimmer returns malloc's freed memory past a threshold, and only then."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import pytest

from mesh.server import memory
from mesh.server.memory import Allocator, Trimmer, glibc_allocator, should_trim


class FakeAllocator:
    def __init__(self, free: int) -> None:
        self.free = free
        self.trims = 0

    def free_bytes(self) -> int:
        return self.free

    def trim(self) -> bool:
        self.trims += 1
        self.free = 0
        return True

    def allocator(self) -> Allocator:
        return Allocator(self.free_bytes, self.trim)


@pytest.mark.parametrize(("free", "due"), [(0, False), (63, False), (64, True), (10_000, True)])
def test_trims_from_the_threshold_on(free: int, due: bool) -> None:
    assert should_trim(free, 64) is due


def test_a_check_trims_only_when_malloc_keeps_enough() -> None:
    fake = FakeAllocator(free=10)
    trimmer = Trimmer(fake.allocator(), threshold_bytes=100)
    assert not trimmer.check()
    fake.free = 500
    assert trimmer.check()
    assert fake.trims == 1 and trimmer.trims == 1
    assert not trimmer.check()  # nothing left to return


def test_the_thread_checks_until_stopped() -> None:
    fake = FakeAllocator(free=500)
    trimmer = Trimmer(fake.allocator(), threshold_bytes=100, interval_s=0.01)
    trimmer.start()
    try:
        deadline = time.monotonic() + 10
        while fake.trims == 0:
            assert time.monotonic() < deadline, "the trimmer never trimmed"
            time.sleep(0.01)
    finally:
        trimmer.stop()
    assert not trimmer._thread.is_alive()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Trimmer(FakeAllocator(0).allocator(), threshold_bytes=0)


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_glibc_free_memory_goes_back_to_the_system() -> None:
    allocator = glibc_allocator()
    if allocator is None or not Path("/proc/self/statm").exists():
        pytest.skip("not glibc on Linux")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024  # below the mmap threshold: from the heap, as grpc's slices are
    blocks = [libc.malloc(size) for _ in range(1024)]
    # A live block above them: the freed ones cannot merge into the top and be released
    # by free() itself, the case large messages leave behind.
    guard = libc.malloc(size)
    try:
        for block in blocks:
            ctypes.memset(block, 1, size)  # resident, as a received message is
        for block in blocks:
            libc.free(block)
        assert allocator.free_bytes() >= 48 << 20
        before = _rss_bytes()
        allocator.trim()
        assert before - _rss_bytes() >= 32 << 20, "the trim returned no pages"
    finally:
        libc.free(guard)


def test_the_process_trimmer_starts_once() -> None:
    first = memory.return_freed_memory()
    assert memory.return_freed_memory() is first
