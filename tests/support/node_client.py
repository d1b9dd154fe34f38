"""The Node.js client of the end-to-end tests (tests/e2e/node/): its npm dependencies, and a run.

The dependencies are pinned in package-lock.json and installed with ``npm ci`` into
tests/e2e/node/node_modules (gitignored), the way ``make`` installs the Python ones: once,
and again only when the lock changes (a stamp in node_modules records the lock's hash).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "e2e" / "node"
CLIENT = NODE_DIR / "client.js"
LOCK = NODE_DIR / "package-lock.json"
MODULES = NODE_DIR / "node_modules"
#: Written after a successful ``npm ci``: the hash of the lock it installed.
STAMP = MODULES / ".meshserve-lock.sha256"
#: Serialises installs: two test runs at once would each wipe the other's node_modules.
INSTALL_LOCK = NODE_DIR / ".npm-install.lock"
INSTALL_TIMEOUT_S = 300.0


def node_or_skip() -> str:
    """The ``node`` to run; skips the test, saying why, where Node.js or npm is absent."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        pytest.skip(f"Node.js client check needs {missing} on PATH")
    return node


def lock_hash() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def installed() -> bool:
    return STAMP.exists() and STAMP.read_text().strip() == lock_hash()


def ensure_installed() -> None:
    """Installs the locked dependencies unless the installed ones match the lock."""
    if installed():
        return
    with INSTALL_LOCK.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if installed():  # another run installed them while this one waited
            return
        npm = shutil.which("npm")
        assert npm is not None
        done = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"[-4000:])
        STAMP.write_text(lock_hash() + "\n")


def run_client(gateway: str, plan: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Runs client.js against ``gateway``; returns its result lines by check name."""
    node = node_or_skip()
    ensure_installed()
    done = subprocess.run(
        [node, str(CLIENT), gateway, str(ROOT / "protos")],
        cwd=NODE_DIR,
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        result = json.loads(line)
        results[result.pop("check")] = result
    assert done.returncode == 0 and "fatal" not in results, (
        f"node client failed ({done.returncode}): {results.get('fatal')}\n{done.stderr[-3000:]}"
    )
    return results
