"""HPACK for the relay: a stateful decoder tuned for gRPC peers and a stateless encoder.

Why not ``hpack.Decoder``/``hpack.Encoder`` directly: on this path every proxied call
decodes two header blocks and encodes two, and the library's general-purpose objects
cost ~50 µs per block here (more than the rest of the relay's work on a call). gRPC's
C core encodes with incremental indexing and no Huffman coding, so after a connection's
first call a request's headers are a few one-byte table indexes: this decoder spends its
time there. It takes the static table and the Huffman decoder from the ``hpack``
package, so the RFC 7541 facts live in one well-kept place.

The encoder never indexes and never Huffman-codes ("literal without indexing", RFC 7541
§6.2.2): its output needs no state, so a header pair's bytes are cached and a block is
a concatenation. The peer's decoder (C, in gRPC) pays nothing for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from mesh.routing.headers import REQUEST_ID

Header = tuple[bytes, bytes]

STATIC: tuple[Header, ...] = HeaderTable.STATIC_TABLE
_STATIC_COUNT = len(STATIC)
#: RFC 7541 §4.1: an entry's size is its name and value plus 32 bytes of overhead.
_ENTRY_OVERHEAD = 32
DEFAULT_TABLE_SIZE = 4096


class HeaderError(ValueError):
    """A header block that does not decode (a connection error: COMPRESSION_ERROR)."""


class HeaderListTooLarge(HeaderError):
    """A decoded header list over the advertised limit (a stream error)."""


class HeaderDecoder:
    """One connection's receive-side HPACK state (its dynamic table)."""

    def __init__(
        self, max_table_size: int = DEFAULT_TABLE_SIZE, max_list_size: int = 1 << 16
    ) -> None:
        #: The most the peer may size the table to: our SETTINGS_HEADER_TABLE_SIZE.
        self.max_table_size = max_table_size
        self.max_list_size = max_list_size
        self._limit = max_table_size
        self._size = 0
        #: Newest first: dynamic index 62 is ``_table[0]``.
        self._table: deque[Header] = deque()
        #: Bumped whenever the table changes: a block's meaning depends on the table.
        self._generation = 0
        #: Blocks that left the table as it was, by bytes: (generation, headers). A gRPC
        #: server's response headers and trailers repeat to the byte once indexed.
        self._seen: dict[bytes, tuple[int, tuple[Header, ...]]] = {}

    def decode(self, block: bytes | bytearray | memoryview) -> list[Header]:
        data = bytes(block)
        hit = self._seen.get(data)
        if hit is not None and hit[0] == self._generation:
            return list(hit[1])
        generation = self._generation
        headers = self._decode(data)
        if self._generation == generation:
            if len(self._seen) >= 256:
                self._seen.clear()
            self._seen[data] = (generation, tuple(headers))
        return headers

    def _decode(self, data: bytes) -> list[Header]:
        end = len(data)
        pos = 0
        headers: list[Header] = []
        listed = 0
        seen_field = False
        while pos < end:
            byte = data[pos]
            if byte & 0x80:  # indexed field
                index, pos = _integer(data, pos, 7)
                header = self._entry(index)
            elif byte & 0x40:  # literal with incremental indexing
                header, pos = self._literal(data, pos, 6)
                self._insert(header)
            elif byte & 0x20:  # dynamic table size update
                if seen_field:
                    raise HeaderError("table size update after a header field")
                size, pos = _integer(data, pos, 5)
                if size > self.max_table_size:
                    raise HeaderError(f"table size update to {size} over {self.max_table_size}")
                self._limit = size
                self._evict(0)
                self._generation += 1
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                header, pos = self._literal(data, pos, 4)
            seen_field = True
            listed += len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
            if listed > self.max_list_size:
                # Keep decoding so the table stays in step, then report it.
                self._drain(data, pos, end)
                raise HeaderListTooLarge(f"header list over {self.max_list_size} bytes")
            headers.append(header)
        return headers

    def _drain(self, data: bytes, pos: int, end: int) -> None:
        while pos < end:
            byte = data[pos]
            if byte & 0x80:
                _, pos = _integer(data, pos, 7)
            elif byte & 0x40:
                header, pos = self._literal(data, pos, 6)
                self._insert(header)
            elif byte & 0x20:
                _, pos = _integer(data, pos, 5)
            else:
                _, pos = self._literal(data, pos, 4)

    def _entry(self, index: int) -> Header:
        if 0 < index <= _STATIC_COUNT:
            return STATIC[index - 1]
        dynamic = index - _STATIC_COUNT - 1
        if index == 0 or dynamic >= len(self._table):
            raise HeaderError(f"header table index {index} out of range")
        return self._table[dynamic]

    def _literal(self, data: bytes, pos: int, prefix: int) -> tuple[Header, int]:
        index, pos = _integer(data, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = _string(data, pos)
        value, pos = _string(data, pos)
        return (name, value), pos

    def _insert(self, header: Header) -> None:
        size = len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
        if size > self._limit:
            # RFC 7541 §4.4: an entry larger than the table empties it and is not added.
            self._table.clear()
            self._size = 0
            self._generation += 1
            return
        self._evict(size)
        self._table.appendleft(header)
        self._size += size
        self._generation += 1

    def _evict(self, room: int) -> None:
        while self._table and self._size + room > self._limit:
            name, value = self._table.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """RFC 7541 §5.1 prefix integer starting at ``data[pos]``; returns (value, next)."""
    mask = (1 << prefix) - 1
    try:
        value = data[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, pos
            shift += 7
            if shift > 28:
                raise HeaderError("header integer too large")
    except IndexError:
        raise HeaderError("header block ends inside an integer") from None


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise HeaderError("header block ends before a string")
    huffman = data[pos] & 0x80
    length, pos = _integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HeaderError("header string runs past the block")
    raw = data[pos:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except Exception as exc:  # the library raises its own error types
            raise HeaderError(f"bad Huffman string: {exc}") from None
    return raw, end


def _encode_integer(value: int, prefix: int, flags: int) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_string(raw: bytes) -> bytes:
    return _encode_integer(len(raw), 7, 0) + raw


#: Static-table index of each name's first entry (names are referenced, never values).
_STATIC_NAMES: dict[bytes, int] = {}
for _i, (_name, _) in enumerate(STATIC, start=1):
    _STATIC_NAMES.setdefault(_name, _i)

_names: dict[bytes, bytes] = {}


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field as a literal without indexing; the name's encoding is cached (names
    repeat, values such as request ids and timeouts do not)."""
    head = _names.get(name)
    if head is None:
        index = _STATIC_NAMES.get(name)
        head = _encode_integer(index, 4, 0) if index else b"\x00" + _encode_string(name)
        if len(_names) < 4096:
            _names[name] = head
    size = len(value)
    return head + (bytes((size,)) + value if size < 0x7F else _encode_string(value))


#: Encoded fields by (name, value): a relayed call's request headers are mostly the same
#: pairs call after call (method, path, authority, content type, user agent, metadata),
#: and a dict hit costs a fraction of encoding the pair again.
_fields: dict[Header, bytes] = {}
#: Names whose values are new on most calls: never cached (they would only churn it).
_UNCACHED = frozenset(
    {b"x-request-id", b"grpc-timeout", b"grpc-message", b"traceparent", b"tracestate"}
)


def _field(field: Header) -> bytes:
    """:func:`encode_field`, remembered in ``_fields`` (on a miss)."""
    name, value = field
    encoded = encode_field(name, value)
    if name not in _UNCACHED and len(value) <= 256:
        if len(_fields) >= 4096:  # names and values are the callers': bounded
            _fields.clear()
        _fields[field] = encoded
    return encoded


_SHORT_BLOCK = 4
_short_blocks: dict[tuple[Header, ...], bytes] = {}
#: The relay ends each response's headers with the call's id (callpolicy.with_request_id):
#: a value new every call, so it is encoded after the cached rest of the block, which
#: it would otherwise make unique (a cache entry per call, the cache cleared every 1024).
_PER_CALL = REQUEST_ID.encode()


class HeaderEncoder:
    """One connection's send-side HPACK: stateless literals after one table resize to 0."""

    def __init__(self) -> None:
        self._first = True

    def encode(self, headers: Iterable[Header]) -> bytes:
        fields = tuple(headers)
        tail = b""
        if fields and fields[-1][0] == _PER_CALL:
            tail = encode_field(*fields[-1])
            fields = fields[:-1]
        if len(fields) <= _SHORT_BLOCK:
            # Response headers and trailers repeat call after call.
            body = _short_blocks.get(fields)
            if body is None:
                body = b"".join([encode_field(n, v) for n, v in fields])
                if len(_short_blocks) >= 1024:
                    _short_blocks.clear()
                _short_blocks[fields] = body
        else:
            known = _fields.get
            body = b"".join([known(field) or _field(field) for field in fields])
        body += tail
        if self._first:
            # We never index, so our table size is 0 whatever the peer's setting; saying
            # so once (RFC 7541 §6.3) keeps any later SETTINGS change trivially honoured.
            self._first = False
            return b"\x20" + body
        return body
