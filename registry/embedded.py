"""A local Elasticsearch-compatible store (the ``noida-db`` binary) for development and tests."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from types import TracebackType

from mesh.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

#: Where ``meshserve up`` keeps the local store's data, relative to the working directory.
DEFAULT_DATA_DIR = Path(".meshserve/store")
#: Written next to the data while a store runs, so other commands can find it.
ENDPOINT_FILE = "endpoint.json"


def noida_binary() -> Path:
    """Path of the ``noida-db`` executable shipped inside the PyPI package."""
    path = Path(str(files("noida_db").joinpath("noida-db")))
    if not path.is_file():
        raise FailedPrecondition(f"noida-db binary not found at {path}; is noida-db installed?")
    if not os.access(path, os.X_OK):
        # Wheels do not always keep the executable bit.
        os.chmod(path, path.stat().st_mode | 0o755)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str, timeout: float = 0.5) -> bool:
    """Whether an Elasticsearch REST endpoint answers ``GET /`` at ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass(frozen=True)
class Endpoint:
    """What a running embedded store advertises in ``<data_dir>/endpoint.json``."""

    url: str
    pid: int

    @classmethod
    def load(cls, data_dir: Path = DEFAULT_DATA_DIR) -> Endpoint | None:
        """The advertised endpoint, alive or not; None when there is no readable file."""
        try:
            raw = json.loads((data_dir / ENDPOINT_FILE).read_text())
            return cls(url=str(raw["url"]), pid=int(raw["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def read(cls, data_dir: Path = DEFAULT_DATA_DIR) -> Endpoint | None:
        """The advertised endpoint if its process is still alive, else None."""
        endpoint = cls.load(data_dir)
        if endpoint is None:
            return None
        try:
            os.kill(endpoint.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by someone else
        return endpoint

    def write(self, data_dir: Path) -> None:
        # Atomic: readers never see half a file.
        tmp = data_dir / f".{ENDPOINT_FILE}.tmp"
        tmp.write_text(json.dumps({"url": self.url, "pid": self.pid}))
        tmp.replace(data_dir / ENDPOINT_FILE)


def _sigterm_on_parent_death() -> None:
    """In the child before exec: ``PR_SET_PDEATHSIG`` (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedStore:
    """Runs ``noida-db`` serving only its Elasticsearch API, on a free loopback port.

    Data lives under ``data_dir`` and survives a clean stop (noida writes it on SIGTERM), so a
    store restarted on the same directory and port comes back with its documents.
    """

    def __init__(
        self,
        data_dir: Path | str = DEFAULT_DATA_DIR,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 20.0,
        advertise: bool = True,
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.start_timeout = start_timeout
        self.advertise = advertise
        #: Linux: noida gets SIGTERM (and saves its data) when the thread that started it
        #: ends, so a ``serve-store`` killed with SIGKILL frees its port for its successor.
        #: Only for a store started from a thread that lives as long as it (a main thread).
        self.die_with_parent = die_with_parent
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the server and returns once it answers; raises ``Unavailable`` otherwise."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "noida.log"
        with open(log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                [
                    str(noida_binary()),
                    "start",
                    "--only",
                    "elasticsearch",
                    "--host",
                    self.host,
                    "--elasticsearch-port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir.resolve()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                # Its own process group: a Ctrl-C meant for the parent does not skip our
                # orderly SIGTERM, which is when noida writes its data.
                start_new_session=True,
                preexec_fn=_sigterm_on_parent_death if self.die_with_parent else None,
            )
        deadline = time.monotonic() + self.start_timeout
        while not answers(self.url):
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise Unavailable(
                    f"noida-db exited with status {code} before answering on {self.url}; "
                    f"see {log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(
                    f"noida-db did not answer on {self.url} within {self.start_timeout:.0f}s; "
                    f"see {log_path}"
                )
            time.sleep(0.05)
        if self.advertise:
            Endpoint(self.url, self._process.pid).write(self.data_dir)
        log.info("embedded Elasticsearch at %s (data in %s)", self.url, self.data_dir)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (noida saves its data), then SIGKILL after ``grace`` seconds."""
        process, self._process = self._process, None
        if process is None:
            return
        if self.advertise:
            current = Endpoint.load(self.data_dir)
            if current is not None and current.pid == process.pid:
                (self.data_dir / ENDPOINT_FILE).unlink(missing_ok=True)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("noida-db did not stop within %.0fs; killing it", grace)
                process.kill()
                process.wait()

    def terminate(self) -> None:
        """Asks the server to stop (it saves its data); ``wait``/``stop`` reap it. Signal-safe."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL without saving: simulates a crash."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def wait(self) -> int:
        """Blocks until the server exits; returns its exit status."""
        if self._process is None:
            return 0
        return self._process.wait()

    def __enter__(self) -> EmbeddedStore:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedStore:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
