"""The user-facing error of every ``meshserve`` command, wherever the command lives.

Below every component, so that cli/ and the components' own commands (gateway/cli.py,
mesh/sidecar/cli.py, workers/*/cli.py) raise the one class cli/main.py catches, without a
component importing the CLI. It imports nothing: ``meshserve --help`` stays instant.

Not defined in cli/main.py: ``python -m cli.main`` runs that file as ``__main__``, and a class
defined there would differ from the one command modules import from ``cli.main``, so main()
would not catch their errors.
"""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""
