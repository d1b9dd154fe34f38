"""A worker's tie to the process that started it: the worker dies with it, however it dies.

Two mechanisms, because each has a hole the other covers:

- ``PR_SET_PDEATHSIG`` (Linux only) has the kernel signal the child when its parent dies.
  It fires when the *thread* that forked the child ends, not the process, so the parent
  must fork from a thread that lives as long as it does (the event loop's main thread).
- A pipe: the parent keeps the write end, the child gets the read end and watches it. The
  kernel closes the write end when the parent dies, even by SIGKILL, so the child reads end
  of file. This works on every POSIX system and whatever thread forked.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

#: The child finds the read end of its lifeline under this environment variable.
PARENT_FD_ENV = "MESHSERVE_PARENT_FD"
#: A folder the parent made for the child (its private socket's). The parent removes it
#: when it ends; a child whose lifeline breaks removes it first, so a parent killed
#: outright leaves nothing behind either.
FOLDER_ENV = "MESHSERVE_UNIT_FOLDER"
_PR_SET_PDEATHSIG = 1
#: After the lifeline breaks, how long the worker may drain before it is ended outright.
DEFAULT_EXIT_GRACE = 30.0


def die_with_parent() -> None:
    """For ``preexec_fn``: SIGTERM this process when the forking thread ends (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the pipe still ties the child to its parent


class Lifeline:
    """The parent's side: a pipe whose read end goes to one child.

    Give ``child_env`` and ``pass_fds`` to the child's spawn, then call ``spawned`` to
    drop the parent's copy of the read end (else the parent itself would keep the pipe
    open and the child never see end of file). The write end is never inherited (Python
    opens pipes close-on-exec), so no other child holds it open after the parent dies.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()

    @property
    def pass_fds(self) -> tuple[int]:
        return (self.read_fd,)

    def child_env(self, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if env is None else env), PARENT_FD_ENV: str(self.read_fd)}

    def spawned(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.read_fd)

    def close(self) -> None:
        """Breaks the lifeline: the child sees end of file (as if the parent died)."""
        self.spawned()
        with contextlib.suppress(OSError):
            os.close(self.write_fd)


def watch(fd: int, on_eof: Callable[[], None]) -> threading.Thread:
    """Calls ``on_eof`` (in a daemon thread) when ``fd`` reaches end of file or fails."""

    def run() -> None:
        try:
            while os.read(fd, 512):
                pass  # the parent never writes; anything read is ignored
        except OSError as exc:
            log.warning("lifeline unreadable (%s): acting as if the parent died", exc)
        with contextlib.suppress(OSError):
            os.close(fd)
        on_eof()

    thread = threading.Thread(target=run, name="lifeline", daemon=True)
    thread.start()
    return thread


def stop_self(grace: float = DEFAULT_EXIT_GRACE) -> None:
    """SIGTERM to this process (a server drains as on any stop), then exit after ``grace``.

    Without a SIGTERM handler yet (still starting), SIGTERM's default action ends the
    process at once; with one, a drain that outlasts ``grace`` is cut short.
    """
    log.warning("the parent process is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    log.error("still running %.0f s after the parent died: exiting", grace)
    os._exit(1)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def watch_from_env(
    environ: MutableMapping[str, str] | None = None,
    on_eof: Callable[[], None] = stop_self,
) -> threading.Thread | None:
    """In the child: watches the lifeline named by ``$MESHSERVE_PARENT_FD``, if any, and
    removes ``$MESHSERVE_UNIT_FOLDER`` (if named) when it breaks, before ``on_eof``.

    The variable is removed, and the descriptor made non-inheritable, so that processes
    this one starts neither hold the pipe nor mistake some other descriptor for it.
    """
    env = os.environ if environ is None else environ
    text = env.pop(PARENT_FD_ENV, None)
    folder = env.pop(FOLDER_ENV, None)
    if text is None:
        return None
    try:
        fd = int(text)
        os.set_inheritable(fd, False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"${PARENT_FD_ENV} is not an open file descriptor: {text!r}") from exc
    if not folder:
        return watch(fd, on_eof)

    def at_exit() -> None:
        # PDEATHSIG's SIGTERM may win the race with the lifeline thread: the drain it
        # starts can end the process before the thread reads end of file, and while a
        # SIGKILLed parent is being torn down it can still look alive (its pid kept,
        # not yet a zombie). The folder serves this process
        # alone (the unit starts one worker per folder and removes it itself once the
        # worker is gone), so whoever exits first removes it: never left behind.
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(at_exit)
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        # Until the server installs its own handler, a SIGTERM (PDEATHSIG's too) ends
        # the process as an exit, not by the signal's default action, so at_exit runs.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def orphaned() -> None:
        # Right away, not at exit: the stop that follows may end this process by a
        # signal's default action, which runs no exit handlers. The socket keeps working
        # for calls in flight; no new caller could reach it anyway, its sidecar is gone.
        shutil.rmtree(folder, ignore_errors=True)
        on_eof()

    return watch(fd, orphaned)
