"""The per-call check: which requests the proxy answers itself, and with what status."""

from __future__ import annotations

import grpc
import pytest

from mesh.routing.callcheck import (
    MessageFramer,
    check_compressed,
    check_end,
    check_headers,
)

GOOD: list[tuple[bytes, bytes]] = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
    (b":authority", b"gateway"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def _with(name: bytes, value: bytes | None) -> list[tuple[bytes, bytes]]:
    """GOOD with ``name`` replaced by ``value`` (None: removed)."""
    headers = [(n, v) for n, v in GOOD if n != name]
    if value is not None:
        headers.append((name, value))
    return headers


@pytest.mark.parametrize(
    ("name", "value", "code", "words"),
    [
        (b":method", b"GET", grpc.StatusCode.UNIMPLEMENTED, "gRPC only"),
        (b":method", None, grpc.StatusCode.UNIMPLEMENTED, "gRPC only"),
        (b"content-type", None, grpc.StatusCode.UNIMPLEMENTED, "gRPC only"),
        (b"content-type", b"application/json", grpc.StatusCode.UNIMPLEMENTED, "gRPC only"),
        (b"content-type", b"application/grpcx", grpc.StatusCode.UNIMPLEMENTED, "gRPC only"),
        (b"te", None, grpc.StatusCode.INTERNAL, "te: trailers"),
        (b"te", b"gzip", grpc.StatusCode.INTERNAL, "te: trailers"),
        (b":scheme", b"ftp", grpc.StatusCode.INTERNAL, ":scheme"),
        (b":scheme", None, grpc.StatusCode.INTERNAL, ":scheme"),
        (b":path", None, grpc.StatusCode.INTERNAL, ":path"),
        (b":path", b"/", grpc.StatusCode.UNIMPLEMENTED, "malformed method path"),
        (b":path", b"/a/b/c", grpc.StatusCode.UNIMPLEMENTED, "malformed method path"),
        (b":path", b"a/b", grpc.StatusCode.UNIMPLEMENTED, "malformed method path"),
        (b":path", b"/svc/", grpc.StatusCode.UNIMPLEMENTED, "malformed method path"),
    ],
)
def test_malformed_headers_are_rejected_with_a_named_problem(
    name: bytes, value: bytes | None, code: grpc.StatusCode, words: str
) -> None:
    rejected = check_headers(_with(name, value))
    assert rejected is not None
    assert rejected.code is code
    assert words in rejected.message


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ([*GOOD, (b"X-Model-Version", b"1")], "'X-Model-Version'"),
        ([*GOOD, (b"", b"x")], "''"),
        ([*GOOD, (b"a b", b"x")], "'a b'"),
        ([*GOOD, (b"x:y", b"x")], "'x:y'"),
        ([*GOOD, (b"connection", b"keep-alive")], "connection-specific header 'connection'"),
        ([*GOOD, (b"keep-alive", b"5")], "connection-specific header 'keep-alive'"),
        ([*GOOD, (b"proxy-connection", b"x")], "connection-specific header 'proxy-connection'"),
        ([*GOOD, (b"transfer-encoding", b"chunked")], "connection-specific header"),
        ([*GOOD, (b"upgrade", b"h2c")], "connection-specific header 'upgrade'"),
        ([*GOOD, (b":foo", b"x")], "pseudo-header ':foo'"),
        ([*GOOD, (b":protocol", b"websocket")], "pseudo-header ':protocol'"),
        ([*GOOD, (b":status", b"200")], "pseudo-header ':status'"),
        ([*GOOD, (b":path", b"/x.Y/Z")], "duplicate pseudo-header ':path'"),
        ([*GOOD, (b":authority", b"other")], "duplicate pseudo-header ':authority'"),
    ],
)
def test_header_names_http2_or_grpc_forbid_are_rejected_by_name(
    headers: list[tuple[bytes, bytes]], words: str
) -> None:
    """RFC 9113 §8.2-8.3 and gRPC's metadata names (0-9 a-z _ - .): forwarded, such a
    header made the worker's gRPC server answer INTERNAL ("Illegal header key"), which
    counted against the worker in outlier detection."""
    rejected = check_headers(headers)
    assert rejected is not None
    assert rejected.code is grpc.StatusCode.INTERNAL
    assert words in rejected.message


@pytest.mark.parametrize(
    "value", [b"abc", b"1", b"S", b"-1S", b"1.5S", b"1s", b" 1S", b"123456789S", b""]
)
def test_a_malformed_grpc_timeout_is_rejected_not_ignored(value: bytes) -> None:
    """gRPC's TimeoutValue is at most 8 digits and a unit (H M S m u n); grpc-core and
    grpc-go answer anything else INTERNAL. The relay ignored it: the call ran with no
    deadline at all."""
    rejected = check_headers([*GOOD, (b"grpc-timeout", value)])
    assert rejected is not None
    assert rejected.code is grpc.StatusCode.INTERNAL
    assert f"grpc-timeout {value.decode()!r}" in rejected.message


@pytest.mark.parametrize("value", [b"1S", b"99999999H", b"0n", b"250m", b"10u", b"5M"])
def test_a_well_formed_grpc_timeout_passes(value: bytes) -> None:
    assert check_headers([*GOOD, (b"grpc-timeout", value)]) is None


@pytest.mark.parametrize(
    "extra",
    [
        (b"x-model-version", b"1"),
        (b"my_key.v2-bin", b"AAEC"),
        (b"grpc-timeout", b"1S"),
        (b"user-agent", b"grpc-python/1.70"),
        (b"x-value", b"any value: with spaces\tand \xff bytes"),
    ],
)
def test_grpc_metadata_names_pass(extra: tuple[bytes, bytes]) -> None:
    assert check_headers([*GOOD, extra]) is None


@pytest.mark.parametrize(
    "content_type",
    [b"application/grpc", b"application/grpc+proto", b"application/grpc;charset=utf-8"],
)
def test_grpc_content_types_are_accepted(content_type: bytes) -> None:
    assert check_headers(_with(b"content-type", content_type)) is None
    assert check_headers(_with(b":scheme", b"https")) is None


@pytest.mark.parametrize(
    ("encoding", "code"),
    [
        (None, grpc.StatusCode.INTERNAL),
        (b"identity", grpc.StatusCode.INTERNAL),
        (b"snappy", grpc.StatusCode.UNIMPLEMENTED),
        (b"gzip", None),
        (b"deflate", None),
    ],
)
def test_a_compressed_message_needs_an_offered_encoding(
    encoding: bytes | None, code: grpc.StatusCode | None
) -> None:
    rejected = check_compressed(encoding)
    assert (rejected.code if rejected else None) is code
    if code is grpc.StatusCode.UNIMPLEMENTED:
        assert rejected is not None
        assert dict(rejected.headers)[b"grpc-accept-encoding"] == b"deflate,gzip,identity"


@pytest.mark.parametrize(
    ("messages", "client_streaming", "rejected"),
    [
        (0, False, True),  # unary or server-streaming without its message
        (1, False, False),
        (0, True, False),  # client streaming: no message is a valid request
        (0, None, False),  # an unknown method: not judged
    ],
)
def test_a_unary_request_must_carry_a_message(
    messages: int, client_streaming: bool | None, rejected: bool
) -> None:
    verdict = check_end(messages, client_streaming=client_streaming)
    assert (verdict is not None) is rejected
    if verdict is not None:
        assert verdict.code is grpc.StatusCode.INTERNAL


def _message(payload: bytes, *, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(payload).to_bytes(4, "big") + payload


def test_the_framer_counts_messages_split_anywhere() -> None:
    body = _message(b"abc") + _message(b"") + _message(b"x" * 300)
    for cut in range(1, len(body)):
        framer = MessageFramer(None)
        assert framer.feed(body[:cut]) is None
        assert framer.feed(body[cut:]) is None
        assert framer.messages == 3, cut
        assert not framer.partial


def test_the_framer_finds_a_compressed_flag_in_a_later_message() -> None:
    body = _message(b"abc") + _message(b"zz", compressed=True)
    framer = MessageFramer(None)
    assert framer.feed(body[:7]) is None
    rejected = framer.feed(body[7:])
    assert rejected is not None and rejected.code is grpc.StatusCode.INTERNAL
    # With an offered encoding the same body passes.
    framer = MessageFramer(b"gzip")
    assert framer.feed(body) is None
    assert framer.messages == 2


def test_a_partial_message_is_reported() -> None:
    framer = MessageFramer(None)
    framer.feed(_message(b"abcdef")[:8])
    assert framer.partial and framer.messages == 0
