"""The CLI's user-facing error, in its own module.

``python -m cli.main`` runs main.py as ``__main__``; a class defined there
would differ from the one command modules import from ``cli.main``, and
main() would not catch their errors.
"""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""
