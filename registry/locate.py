"""Which discovery store a command talks to: the flag, the environment, else the running
``meshserve up``'s or the local embedded one.

Shared by every command that opens the store (the CLI's and the gateway's, sidecar's and
workers' own), so it lives in the registry, below all of them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mesh.errors import Unavailable
from registry.connect import ES_URL_ENV
from registry.embedded import Endpoint
from registry.state_dir import UpEndpoints, state_dir_from_args

#: Where ``meshserve up`` runs its embedded store, under its state folder.
STORE_SUBDIR = "store"


class NoStore(Unavailable):
    """Neither a URL nor a running local store."""


def resolve_url(args: argparse.Namespace) -> str:
    """--es, else $MESHSERVE_ES_URL, else the store of the ``meshserve up`` running under the
    state folder (--state-dir, else $MESHSERVE_STATE_DIR, else .meshserve): the one its
    up.json names, else the embedded store under ``<state>/store`` (``registry serve-store``).
    """
    if getattr(args, "es", None):
        return str(args.es)
    if os.environ.get(ES_URL_ENV):
        return os.environ[ES_URL_ENV]
    state_dir = state_dir_from_args(args)
    up = UpEndpoints.read(state_dir)
    if up is not None and up.es_url:
        return up.es_url
    data_dir = Path(getattr(args, "data_dir", None) or state_dir / STORE_SUBDIR)
    endpoint = Endpoint.read(data_dir)
    if endpoint is None:
        raise NoStore(
            f"no discovery store: {ES_URL_ENV} is unset and no `meshserve up` or local store "
            f"runs under {state_dir}/ (start one with `meshserve up` or `meshserve registry "
            "serve-store`, or pass --state-dir or --es)"
        )
    return endpoint.url
