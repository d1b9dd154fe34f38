"""The unit-private preload exchange between a sidecar and its joining inference worker.

Both ride on ``ServerReady``, as the load report does (mesh/balance/report.py), so no new
RPC exists for a caller to reach: a worker that waits for a preload lists its servable
versions in the trailers (:data:`SERVABLE_HEADER`); its sidecar answers with one
``ServerReady`` carrying :data:`PRELOAD_HEADER`, the versions the ring gives the worker.
The sidecar's relay drops :data:`PRELOAD_HEADER` from every caller's request
(mesh/proxy/inbound.py), so only the sidecar itself can send it.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Trailer of ServerReady while the worker waits for a preload: ``name:version,...``.
SERVABLE_HEADER = "x-meshserve-servable"
#: Request header of the sidecar's ServerReady: the versions to load first
#: (``name:version,...``, possibly none), or :data:`ALL` when the ring tells nothing.
PRELOAD_HEADER = "x-meshserve-preload"
ALL = "*"

Version = tuple[str, int]


def format_versions(versions: Iterable[Version]) -> str:
    return ",".join(f"{name}:{number}" for name, number in sorted(set(versions)))


def parse_versions(text: str) -> frozenset[Version]:
    """``name:version,...`` (empty: none); raises ValueError naming a malformed entry."""
    found: set[Version] = set()
    for entry in text.split(",") if text.strip() else ():
        name, sep, number = entry.strip().rpartition(":")
        if not sep or not name or not number.isdigit() or not number.isascii():
            raise ValueError(f"{entry.strip()!r} is not name:version (version a number >= 0)")
        found.add((name, int(number)))
    return frozenset(found)


def parse_preload(text: str) -> frozenset[Version] | None:
    """A :data:`PRELOAD_HEADER` value: the versions, or None for :data:`ALL`."""
    return None if text.strip() == ALL else parse_versions(text)


def by_model(versions: Iterable[Version]) -> dict[str, list[int]]:
    """``{name: [versions, ascending]}`` (what :func:`owned_versions` reads)."""
    grouped: dict[str, list[int]] = {}
    for name, number in sorted(set(versions)):
        grouped.setdefault(name, []).append(number)
    return grouped
