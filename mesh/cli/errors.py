"""The CLI's user-facing error, in its own module.

``python -m mesh.cli.main`` runs main.py as ``__main__``; a class defined there
would differ from the one command modules import from ``mesh.cli.main``, and
main() would not catch their errors.
"""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""
