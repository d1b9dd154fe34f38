"""``meshserve auth new-key``: mints an API key and prints the line the auth file stores."""

from __future__ import annotations

import argparse
import re

from rich.console import Console
from rich.markup import escape

from gateway.auth import ADMIN_SCOPE, hash_key, new_key
from mesh.errors import InvalidArgument

out = Console(highlight=False, soft_wrap=True)
_CLIENT = re.compile(r"[A-Za-z0-9._@-]+")


def cmd_new_key(args: argparse.Namespace) -> int:
    if not _CLIENT.fullmatch(args.client):
        raise InvalidArgument(
            f"client name {args.client!r} must be letters, digits, '.', '_', '@', '-'"
        )
    key = new_key()
    # The key goes to the client once; only its hash is kept in the auth file.
    out.print(f"key (give it to {args.client}; it is not stored anywhere): {key}")
    out.print("add to the gateway's auth file under apiKeys:")
    scopes = f", scopes: [{', '.join(args.scopes)}]" if args.scopes else ""
    # Escaped: "[admin]" would read as rich markup.
    out.print(escape(f'  - {{client: {args.client}, sha256: "{hash_key(key)}"{scopes}}}'))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    auth = subparsers.add_parser("auth", help="gateway client credentials")
    sub = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    key = sub.add_parser("new-key", help="mint an API key and print its hashed config entry")
    key.add_argument("--client", required=True, help="the client the key identifies")
    key.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        default=[],
        choices=(ADMIN_SCOPE,),
        help=f"what the key grants beyond the data plane ({ADMIN_SCOPE}: the Admin API)",
    )
    key.set_defaults(handler=cmd_new_key)
