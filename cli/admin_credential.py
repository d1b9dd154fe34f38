"""The local admin credential: ``up`` makes it, the commands that call Admin send it.

``up`` writes ``<state>/admin.key`` (mode 0600, kept across restarts) and an auth file for
its gateway that holds only the key's hash, with the ``admin`` scope, and leaves the data
plane open (``dataPlane: open``). ``meshserve apply``, ``config …`` and ``route explain``
send the key from ``$MESHSERVE_ADMIN_KEY``, else from the running ``up``'s state folder,
unless ``--api-key`` says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from cli.headers import sendable
from gateway.auth import ADMIN_SCOPE, API_KEY_HEADER, hash_key, new_key
from mesh.cli_error import CliError
from registry.state_dir import DEFAULT_STATE_DIR

ADMIN_KEY_FILE = "admin.key"
ADMIN_AUTH_FILE = "gateway-auth.yaml"
ADMIN_KEY_ENV = "MESHSERVE_ADMIN_KEY"
ADMIN_CLIENT = "local-admin"


def _read_key(path: Path) -> str | None:
    try:
        key = path.read_text().strip()
    except OSError:
        return None
    return key or None


def ensure_admin_credential(state_dir: Path) -> Path:
    """Makes (or keeps) ``<state>/admin.key`` and writes the gateway's auth file for it.

    Returns the auth file, for ``meshserve gateway --auth-config``. The key is created
    with mode 0600 from the start (never readable by others, not even briefly).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    key_path = state_dir / ADMIN_KEY_FILE
    key = _read_key(key_path)
    if key is None:
        key = new_key()
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(key + "\n")
    os.chmod(key_path, 0o600)
    auth_path = state_dir / ADMIN_AUTH_FILE
    tmp = state_dir / f".{ADMIN_AUTH_FILE}.tmp"
    tmp.write_text(
        "# Written by `meshserve up`: the Admin API takes the key in admin.key; the data\n"
        "# plane needs no credential. Delete admin.key to make up mint a new one.\n"
        "apiKeys:\n"
        f'  - {{client: {ADMIN_CLIENT}, sha256: "{hash_key(key)}", scopes: [{ADMIN_SCOPE}]}}\n'
        "dataPlane: open\n"
    )
    tmp.replace(auth_path)
    return auth_path


def admin_key(explicit: str | None = None, state_dir: Path = DEFAULT_STATE_DIR) -> str | None:
    """The key to send: ``--api-key``, else ``$MESHSERVE_ADMIN_KEY``, else the state folder's."""
    if explicit:
        return _sendable(explicit, "--api-key")
    if os.environ.get(ADMIN_KEY_ENV):
        return _sendable(os.environ[ADMIN_KEY_ENV], f"${ADMIN_KEY_ENV}")
    path = state_dir / ADMIN_KEY_FILE
    key = _read_key(path)
    return None if key is None else _sendable(key, str(path))


def _sendable(key: str, source: str) -> str:
    """``key``, if gRPC can send it as metadata (printable ASCII): grpc refuses anything
    else deep in the call, and the command ended in its traceback."""
    if not sendable(key):
        raise CliError(
            f"the admin key from {source} is not printable ASCII "
            "(a stray character or line ending?)"
        )
    return key


def admin_metadata(
    explicit: str | None = None, state_dir: Path = DEFAULT_STATE_DIR
) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying the admin key, or none when there is no key to send."""
    key = admin_key(explicit, state_dir)
    return ((API_KEY_HEADER, key),) if key else ()


def own_admin_metadata(state_dir: Path) -> tuple[tuple[str, str], ...]:
    """The metadata carrying the key of ``state_dir`` itself, never ``$MESHSERVE_ADMIN_KEY``:
    what ``up`` and its commands send to ``up``'s own gateway, whichever key the shell
    holds for another."""
    key = _read_key(state_dir / ADMIN_KEY_FILE)
    return ((API_KEY_HEADER, key),) if key else ()
