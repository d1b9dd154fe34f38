"""gRPC metadata as ordered pairs, and Istio header edits (remove, set, add) applied to it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mesh.config.virtual_service import HeaderOperations

Metadata = tuple[tuple[str, str], ...]


def normalise(metadata: Iterable[tuple[str, str | bytes]]) -> Metadata:
    """Lower-case keys; binary (``-bin``) values are kept out of routing (cannot be matched)."""
    return tuple((k.lower(), v) for k, v in metadata if isinstance(v, str))


def as_dict(metadata: Sequence[tuple[str, str]]) -> dict[str, str]:
    """One value per key; repeated keys join with "," as HTTP/2 header folding does."""
    merged: dict[str, str] = {}
    for key, value in metadata:
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    return merged


def apply(operations: HeaderOperations, metadata: Sequence[tuple[str, str]]) -> Metadata:
    """Applies one block of edits: ``remove`` first, then ``set`` replaces, then ``add`` appends."""
    replaced = {k for k, _ in operations.set} | set(operations.remove)
    result = [(k, v) for k, v in metadata if k not in replaced]
    result.extend(operations.set)
    result.extend(operations.add)
    return tuple(result)


def get(metadata: Sequence[tuple[str, str]], name: str) -> str | None:
    return as_dict(metadata).get(name)
