"""The relay's HPACK codec against the reference implementation (the ``hpack`` package)."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.proxy import hpack_codec
from mesh.proxy.hpack_codec import (
    HeaderDecoder,
    HeaderEncoder,
    HeaderError,
    HeaderListTooLarge,
    encode_field,
)

GRPC_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
    (b":authority", b"127.0.0.1:8080"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"4999m"),
    (b"x-model-version", b"3"),
]

names = st.binary(min_size=1, max_size=20).map(lambda b: b.lower())
header_lists = st.lists(st.tuples(names, st.binary(max_size=60)), max_size=12)


def test_decodes_a_grpc_peers_blocks_as_they_index_more_and_more() -> None:
    encoder, decoder = hpack.Encoder(), HeaderDecoder()
    for timeout in (b"5S", b"4999m", b"4999m", b"12u"):
        headers = [*GRPC_REQUEST[:-2], (b"grpc-timeout", timeout), GRPC_REQUEST[-1]]
        assert decoder.decode(encoder.encode(headers)) == headers


@settings(max_examples=150, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=6), st.booleans())
def test_a_sequence_of_blocks_decodes_like_the_reference(
    blocks: list[list[tuple[bytes, bytes]]], huffman: bool
) -> None:
    """Stateful: indexing, eviction and Huffman strings, block after block."""
    encoder, decoder = hpack.Encoder(), HeaderDecoder()
    encoder.header_table_size = 256  # small, so entries are evicted
    for block in blocks:
        assert decoder.decode(encoder.encode(block, huffman=huffman)) == block


@settings(max_examples=150, deadline=None)
@given(header_lists)
def test_our_encoding_decodes_with_the_reference_and_with_ours(
    headers: list[tuple[bytes, bytes]],
) -> None:
    encoder = HeaderEncoder()
    reference, ours = hpack.Decoder(), HeaderDecoder()
    for _ in range(2):  # the first block carries the table-size update, the second not
        block = encoder.encode(headers)
        assert reference.decode(block, raw=True) == headers
        assert ours.decode(block) == headers


def test_a_response_ending_with_its_request_id_reuses_the_cached_rest() -> None:
    encoder, reference = HeaderEncoder(), hpack.Decoder()
    encoder.encode([])  # the table-size update
    base = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    encoder.encode(base)
    cached = len(hpack_codec._short_blocks)
    for call in range(50):
        block = [*base, (b"x-request-id", f"{call:032x}".encode())]
        assert reference.decode(encoder.encode(block), raw=True) == block
    # A new id every call, yet no new cache entry: the cache keeps its other blocks.
    assert len(hpack_codec._short_blocks) == cached


def test_a_request_block_reuses_its_cached_fields_but_not_per_call_values() -> None:
    encoder, reference = HeaderEncoder(), hpack.Decoder()
    encoder.encode([])  # the table-size update
    hpack_codec._fields.clear()
    for call in range(50):
        # Fresh value objects each call, as a decoded request's are.
        block = [(n, bytes(bytearray(v))) for n, v in GRPC_REQUEST]
        block.append((b"x-request-id", f"{call:032x}".encode()))
        assert reference.decode(encoder.encode(block), raw=True) == block
    # The repeating pairs are cached once; the deadline and the ids never are.
    cached = set(hpack_codec._fields)
    assert (b":path", b"/inference.GRPCInferenceService/ModelInfer") in cached
    assert not any(name in (b"x-request-id", b"grpc-timeout") for name, _ in cached)
    assert len(cached) == len(GRPC_REQUEST) - 1


def test_encoding_is_stateless_literals() -> None:
    # Name from the static table (index 4 is :path), value literal, no Huffman.
    assert encode_field(b":path", b"/a") == bytes([0x04, 0x02]) + b"/a"
    assert encode_field(b"x-a", b"1") == b"\x00\x03x-a\x011"


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        (b"\xff", "ends inside an integer"),
        (b"\x80", "index 0"),
        (b"\xbf", "out of range"),  # dynamic index 63 with an empty table
        (b"\x00\x05ab", "runs past"),
        (b"\x3f\xe2\x1f", "over 4096"),  # a table size update to 4097
        (b"\x82\x20", "after a header field"),
    ],
)
def test_malformed_blocks_raise_header_error(block: bytes, problem: str) -> None:
    with pytest.raises(HeaderError, match=problem):
        HeaderDecoder(max_table_size=4096).decode(block)


def test_an_oversized_header_list_is_reported_and_the_table_stays_in_step() -> None:
    encoder, decoder = hpack.Encoder(), HeaderDecoder(max_list_size=100)
    big = [(b"x-big", b"v" * 200)]
    with pytest.raises(HeaderListTooLarge):
        decoder.decode(encoder.encode(big))
    # The entry was still added: the encoder's next block refers to it by index.
    small = [(b"x-big", b"v" * 200)]
    decoder.max_list_size = 1000
    assert decoder.decode(encoder.encode(small)) == small


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_header_error(block: bytes) -> None:
    """Nothing but HeaderError escapes (the relay turns it into COMPRESSION_ERROR)."""
    try:
        headers = HeaderDecoder().decode(block)
    except HeaderError:
        return
    assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in headers)


def test_a_repeated_block_is_decoded_against_the_table_as_it_is_now() -> None:
    """Blocks are reused by their bytes only while the dynamic table is unchanged: the
    same index names another entry after an insertion."""
    decoder = HeaderDecoder()
    newest = b"\xbe"  # dynamic index 62: the newest entry
    assert decoder.decode(b"\x40\x03x-a\x011") == [(b"x-a", b"1")]
    assert decoder.decode(newest) == [(b"x-a", b"1")]
    assert decoder.decode(newest) == [(b"x-a", b"1")]  # the reused decoding
    assert decoder.decode(b"\x40\x03x-b\x012") == [(b"x-b", b"2")]
    assert decoder.decode(newest) == [(b"x-b", b"2")]
    assert decoder.decode(b"\x20") == []  # a size update to 0 empties the table
    with pytest.raises(HeaderError, match="out of range"):
        decoder.decode(newest)
