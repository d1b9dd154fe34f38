"""Header names the mesh reads or writes, gRPC metadata as ordered pairs, and Istio header
edits (remove, set, add) applied to it or to an HTTP/2 header block."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from mesh.config.virtual_service import HeaderOperations

Metadata = tuple[tuple[str, str], ...]
#: An HTTP/2 header field as the relay's HPACK codec carries it.
RawHeader = tuple[bytes, bytes]

# -- the one list of header names (every module imports them from here) --------------------
#: The model version a call is for: the Istio-style consistent-hash key.
MODEL_VERSION = "x-model-version"
#: A call's id, kept when the client sends one, made by the first proxy otherwise.
REQUEST_ID = "x-request-id"
#: Marks a mirrored copy (Istio's ``-shadow`` host suffix plays the same part).
SHADOW = "x-meshserve-shadow"
#: The caller's identity, as a sidecar's inbound passes it to its worker.
PEER = "x-meshserve-peer"
#: gRPC's retry pushback trailer (A6): how long a client should wait before retrying.
RETRY_PUSHBACK = "grpc-retry-pushback-ms"
#: A call's deadline on the wire.
GRPC_TIMEOUT = "grpc-timeout"


def normalise(metadata: Iterable[tuple[str, str | bytes]]) -> Metadata:
    """Lower-case keys; binary (``-bin``) values are kept out of routing (cannot be matched)."""
    return tuple((k.lower(), v) for k, v in metadata if isinstance(v, str))


class TextHeaders(dict[str, str]):
    """A call's text headers by name, with the names sent more than once (``repeated``):
    a check that must see one value of a header (a credential) refuses the call rather
    than guess which value is meant."""

    repeated: frozenset[str] = frozenset()


def as_dict(metadata: Iterable[tuple[str, str]], repeated: Iterable[str] = ()) -> TextHeaders:
    """One value per key; repeated keys join with "," as HTTP/2 header folding does, and
    are noted in ``repeated`` (with ``repeated`` given: names known repeated besides, those
    of the headers ``metadata`` was filtered from).

    Every policy that reads a header (AuthorizationPolicy's ``request.headers``, the JWT
    of RequestAuthentication, the gateway's credentials) reads it through this: keeping
    one value of several let a caller repeat a header to dodge a DENY on it while the
    worker still read the denied value (Envoy's CVE-2020-25017, fixed the same way).
    """
    merged = TextHeaders()
    seen_twice = set(repeated)
    for key, value in metadata:
        if key in merged:
            seen_twice.add(key)
            merged[key] = f"{merged[key]},{value}"
        else:
            merged[key] = value
    merged.repeated = frozenset(seen_twice)
    return merged


def text_headers(headers: Iterable[RawHeader]) -> TextHeaders:
    """An HTTP/2 header block's text metadata as policies read it: no pseudo-headers or
    binary (``-bin``) values, names lower-case, repeated names joined (:func:`as_dict`)."""
    return as_dict(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in headers
        if name[:1] != b":" and not name.endswith(b"-bin")
    )


def from_invocation(metadata: Iterable[tuple[str, str | bytes]] | None) -> TextHeaders:
    """A gRPC server's ``invocation_metadata()`` as policies read it (:func:`normalise`,
    then :func:`as_dict`): what a guard behind grpc sees as the relay's guards see it."""
    return as_dict(normalise(metadata or ()))


def repeated(headers: Mapping[str, str]) -> frozenset[str]:
    """The names sent more than once (none known for a plain mapping)."""
    return headers.repeated if isinstance(headers, TextHeaders) else frozenset()


def apply(operations: HeaderOperations, metadata: Sequence[tuple[str, str]]) -> Metadata:
    """Applies one block of edits: ``remove`` first, then ``set`` replaces, then ``add`` appends."""
    replaced = {k for k, _ in operations.set} | set(operations.remove)
    result = [(k, v) for k, v in metadata if k not in replaced]
    result.extend(operations.set)
    result.extend(operations.add)
    return tuple(result)


def get(metadata: Sequence[tuple[str, str]], name: str) -> str | None:
    return as_dict(metadata).get(name)


def _editable(name: bytes) -> bool:
    """Response header edits touch metadata only: not pseudo-headers, gRPC's own
    (``grpc-status``, ``grpc-message``, …), the content type, nor binary values."""
    return not (
        name[:1] == b":"
        or name.startswith(b"grpc-")
        or name == b"content-type"
        or name.endswith(b"-bin")
    )


def edit_block(
    operations: Sequence[HeaderOperations], block: Sequence[RawHeader]
) -> list[RawHeader]:
    """Applies response header edits (in order: rule, then destination) to an HTTP/2
    header block: the fields edits may not touch keep their place at the front, the
    edited metadata follows."""
    if not operations:
        return list(block)
    kept = [(n, v) for n, v in block if not _editable(n)]
    text: Metadata = tuple(
        (n.decode("latin-1"), v.decode("latin-1")) for n, v in block if _editable(n)
    )
    for ops in operations:
        text = apply(ops, text)
    kept.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in text)
    return kept
