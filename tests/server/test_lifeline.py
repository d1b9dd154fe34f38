"""A worker's lifeline: it stops when the pipe from its parent breaks, with or without PDEATHSIG."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mesh.server.lifeline import FOLDER_ENV, PARENT_FD_ENV, Lifeline, watch, watch_from_env
from tests.support.processes import REPO

DEADLINE = 30.0


def test_the_watcher_fires_on_end_of_file_and_not_before() -> None:
    lifeline = Lifeline()
    broken = threading.Event()
    thread = watch(lifeline.read_fd, broken.set)
    os.write(lifeline.write_fd, b"noise")  # what the parent writes is ignored
    assert not broken.wait(0.2)
    assert thread.is_alive()
    os.close(lifeline.write_fd)  # what the kernel does when the parent dies
    assert broken.wait(DEADLINE)
    thread.join(DEADLINE)
    assert not thread.is_alive()


def test_the_variable_is_taken_once_and_checked() -> None:
    assert watch_from_env({}, on_eof=lambda: None) is None
    with pytest.raises(ValueError, match=PARENT_FD_ENV):
        watch_from_env({PARENT_FD_ENV: "seven"}, on_eof=lambda: None)
    lifeline = Lifeline()
    env = {PARENT_FD_ENV: str(lifeline.read_fd), "OTHER": "x"}
    broken = threading.Event()
    thread = watch_from_env(env, on_eof=broken.set)
    assert thread is not None
    # Removed, so that processes the worker starts do not take some other fd for it.
    assert env == {"OTHER": "x"}
    assert not os.get_inheritable(lifeline.read_fd)
    os.close(lifeline.write_fd)
    assert broken.wait(DEADLINE)


def test_a_broken_lifeline_removes_the_units_folder_before_stopping(tmp_path: Path) -> None:
    folder = tmp_path / "unit"
    folder.mkdir()
    (folder / "worker.sock").touch()
    lifeline = Lifeline()
    env = {PARENT_FD_ENV: str(lifeline.read_fd), FOLDER_ENV: str(folder)}
    seen: list[bool] = []
    broken = threading.Event()

    def on_eof() -> None:
        seen.append(folder.exists())
        broken.set()

    assert watch_from_env(env, on_eof=on_eof) is not None
    assert env == {}  # neither variable reaches what the worker starts
    assert folder.exists()  # nothing happens while the parent lives
    os.close(lifeline.write_fd)
    assert broken.wait(DEADLINE)
    # Gone before the stop began: a stop by signal would run no exit handler.
    assert seen == [False]


def test_a_worker_exits_when_its_lifeline_breaks_without_pdeathsig() -> None:
    """This test process is the parent and stays alive: only the pipe can stop the worker."""
    lifeline = Lifeline()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mesh.sidecar.worker_proc", "w1"],
        cwd=REPO,
        env={**lifeline.child_env(), "PYTHONPATH": str(REPO)},
        pass_fds=lifeline.pass_fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lifeline.spawned()
    try:
        assert process.stdout is not None
        assert "w1 listening on " in process.stdout.readline()
        assert process.poll() is None
        lifeline.close()
        deadline = time.monotonic() + DEADLINE
        while process.poll() is None:
            assert time.monotonic() < deadline, "the worker outlived its lifeline"
            time.sleep(0.05)
        # Stopped by the SIGTERM it sends itself: drained (0) or, if that came before its
        # handler was installed, by SIGTERM's default action.
        assert process.returncode in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(DEADLINE)
        if process.stdout is not None:
            process.stdout.close()


#: A child that watches its lifeline with a unit folder, then exits on its own (as a worker
#: whose drain after PDEATHSIG's SIGTERM ends before the lifeline thread sees end of file).
_EXITS = """
from mesh.server.lifeline import watch_from_env
watch_from_env()
print("watching", flush=True)
"""


def test_a_worker_that_exits_removes_its_folder_while_the_parent_still_looks_alive(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "unit"
    folder.mkdir()
    (folder / "worker.sock").touch()
    lifeline = Lifeline()
    done = subprocess.run(
        [sys.executable, "-c", _EXITS],
        cwd=REPO,
        env={**lifeline.child_env(), FOLDER_ENV: str(folder), "PYTHONPATH": str(REPO)},
        pass_fds=lifeline.pass_fds,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    try:
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "watching"
        # This process (its parent) lives and the lifeline is whole: the folder went anyway.
        assert not folder.exists()
    finally:
        lifeline.close()
