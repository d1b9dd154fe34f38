"""Argparse types shared by the flags of every ``meshserve`` command, wherever it lives.

Beside mesh/cli_error.py and for the same reason (cli/ and the components' own commands
use them without a component importing the CLI); it imports only argparse, so building a
parser stays instant.
"""

from __future__ import annotations

import argparse


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (0: any free one). Out of range, the bind raised OverflowError
    deep in start-up and the command ended in its traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value
