"""What an Elasticsearch URL must look like, checked where it is given (a flag, a setting).

Standard library only: ``meshserve`` builds its parsers without importing the store client.
"""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot name an Elasticsearch node, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        return f"Elasticsearch URL {url!r} must look like http(s)://host:port"
    return None


def store_url(text: str) -> str:
    """The argparse type of ``--es``: refused before a command starts anything (``up``
    started every unit, each of which then failed on the URL)."""
    problem = url_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text
