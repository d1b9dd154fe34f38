"""The TCP mode's door check: a worker on a loopback port serves only its own sidecar.

Any local process can dial a loopback port, so a worker that must listen on one (a
Kubernetes pod: worker and sidecar are separate containers) checks that each call comes
from its sidecar: the two share a per-unit secret, the sidecar sends it as a metadata
header on every call, and the worker compares it, in constant time, before any handler
runs. A call without it is answered UNAUTHENTICATED. Under ``meshserve run`` the worker
listens on a Unix socket in a private folder instead, and needs no secret.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from mesh.errors import Unauthenticated
from mesh.security.guard import Context

#: Metadata header the sidecar adds to every call to its worker (never forwarded from callers).
HEADER = "x-meshserve-sidecar-secret"
#: A shorter secret is refused: it could be guessed.
MIN_LENGTH = 16


def new_secret() -> str:
    """256 random bits, printable (it travels as an ASCII metadata value)."""
    return secrets.token_urlsafe(32)


def read_secret(path: Path) -> str:
    """The secret in ``path`` (surrounding whitespace ignored); refuses one too short."""
    text = path.read_text().strip()
    if len(text) < MIN_LENGTH or not text.isascii() or not text.isprintable():
        raise ValueError(
            f"{path}: the sidecar secret must be at least {MIN_LENGTH} printable ASCII "
            f"characters (e.g. the output of `openssl rand -base64 32`)"
        )
    return text


def write_secret(path: Path) -> str:
    """Writes a new secret to ``path``, readable by this user only, replacing any there.

    Atomic (a temporary file, then a rename): a reader sees the old secret or the new one,
    never part of one, and a rerun (a Kubernetes init container after a pod restart) works.
    """
    secret = new_secret()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(secret + "\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return secret


class SecretCheck:
    """A ``GuardInterceptor`` check: the call carries the sidecar's secret, or is refused."""

    def __init__(self, secret: str) -> None:
        if len(secret) < MIN_LENGTH:
            raise ValueError(f"the sidecar secret must be at least {MIN_LENGTH} characters")
        self._expected = secret.encode()

    async def __call__(self, method: str, context: Context) -> None:
        given = b""
        for key, value in context.invocation_metadata() or ():
            if key == HEADER:
                given = value.encode() if isinstance(value, str) else value
                break
        # compare_digest takes as long whatever the first differing byte: no timing oracle.
        if not hmac.compare_digest(given, self._expected):
            raise Unauthenticated(
                "this worker serves its sidecar only: call it through the sidecar's port"
            )
