"""A worker's lifeline: it stops when the pipe from its parent breaks, with or without PDEATHSIG."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mesh.server.lifeline import PARENT_FD_ENV, Lifeline, watch, watch_from_env
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
