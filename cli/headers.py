"""``-H 'KEY: VALUE'``: call metadata from the command line, as grpcurl takes it.

Shared by the commands that call through the gateway for a user (``call``, ``infer``): a
gateway whose data plane wants a credential (``x-api-key`` or ``authorization: Bearer``,
docs/security.md) is reached with the same flag as with grpcurl.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import re
from collections.abc import Sequence

from mesh.cli_error import CliError

#: What gRPC accepts as a metadata key (lower case once normalised); grpc raises a bare
#: "metadata was invalid" on anything else, which names neither the key nor the flag.
_KEY = re.compile(r"[0-9a-z_.\-]+")
Metadata = tuple[tuple[str, str | bytes], ...]


def sendable(value: str) -> bool:
    """Whether gRPC sends ``value`` as a text metadata value (printable ASCII); anything
    else it refuses deep in the call ("Invalid metadata"), in a traceback."""
    return value.isascii() and value.isprintable()


def add_header_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="KEY: VALUE",
        help="call metadata, as grpcurl's -H (e.g. -H 'x-api-key: KEY'); repeatable; "
        "a -bin key's value is base64",
    )


def parse_headers(pairs: Sequence[str]) -> Metadata:
    """``KEY: VALUE`` (or ``KEY=VALUE``) pairs as gRPC metadata: keys lower-cased, a
    ``-bin`` key's value base64-decoded to bytes (grpcurl's rule), bad ones named."""
    metadata: list[tuple[str, str | bytes]] = []
    for pair in pairs:
        key, sep, value = pair.partition(":")
        if not sep:
            key, sep, value = pair.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key:
            raise CliError(f"-H needs KEY: VALUE, got {pair!r}")
        if not _KEY.fullmatch(key) or key.startswith("grpc-"):
            raise CliError(
                f"-H {key!r}: a metadata key is letters, digits, '_', '.' and '-', "
                "and not a reserved grpc- name"
            )
        if key.endswith("-bin"):
            try:
                metadata.append(
                    (key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True))
                )
            except binascii.Error:
                raise CliError(f"-H {key!r}: a -bin value is base64, got {value!r}") from None
        elif not sendable(value):
            raise CliError(f"-H {key!r}: the value must be printable ASCII (or use a -bin key)")
        else:
            metadata.append((key, value))
    return tuple(metadata)
