"""A Unix socket in a private folder: only this user (and root) can reach what listens there."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PrivateSocket:
    """``unix:<folder>/<name>`` where ``folder`` is a fresh directory of mode 0700.

    A loopback port is open to every local process; a socket in a folder no other user can
    enter is not (the kernel checks the folder's search permission on ``connect``). Root
    still passes: permissions never stop root.
    """

    folder: Path
    name: str

    @classmethod
    def create(cls, prefix: str, name: str = "grpc.sock") -> PrivateSocket:
        # mkdtemp creates the folder with mode 0700, atomically, under a name no one else
        # could have prepared.
        return cls(Path(tempfile.mkdtemp(prefix=prefix)), name)

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @property
    def address(self) -> str:
        """What a server listens on and a channel dials (gRPC's ``unix:PATH``)."""
        return f"unix:{self.path}"

    def remove(self) -> None:
        """Removes the folder and the socket in it (idempotent)."""
        shutil.rmtree(self.folder, ignore_errors=True)
