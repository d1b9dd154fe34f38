"""HTTP/2 framing (RFC 9113 §4, §6): frame types, flags, settings and frame builders."""

from __future__ import annotations

import struct
from collections.abc import Mapping

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings.
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

DEFAULT_WINDOW = 65_535
MAX_WINDOW = (1 << 31) - 1
#: The smallest SETTINGS_MAX_FRAME_SIZE a peer may advertise; the relay advertises this
#: too, so any frame it receives can be forwarded to any peer unsplit.
MIN_MAX_FRAME_SIZE = 16_384

_HEADER = struct.Struct(">HBBBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


class ProtocolError(Exception):
    """A connection error: the connection ends with GOAWAY and this code."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def parse_header(buffer: bytes | bytearray, pos: int) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of the frame header at ``buffer[pos:pos + 9]``."""
    high, low, kind, flags, stream_id = _HEADER.unpack_from(buffer, pos)
    return (high << 8) | low, kind, flags, stream_id & 0x7FFF_FFFF


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def headers(stream_id: int, block: bytes, *, end_stream: bool, max_size: int) -> bytes:
    """A header block as HEADERS and, when it is larger than a frame, CONTINUATION frames."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_size:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    parts = [block[i : i + max_size] for i in range(0, len(block), max_size)]
    out = [frame(HEADERS, flags, stream_id, parts[0])]
    for part in parts[1:-1]:
        out.append(frame(CONTINUATION, 0, stream_id, part))
    out.append(frame(CONTINUATION, END_HEADERS, stream_id, parts[-1]))
    return b"".join(out)


def settings(values: Mapping[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise ProtocolError("SETTINGS payload not a multiple of 6", FRAME_SIZE_ERROR)
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def parse_u32(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError("frame payload must be 4 bytes", FRAME_SIZE_ERROR)
    value: int = _U32.unpack(payload)[0]
    return value & 0x7FFF_FFFF


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code) + debug)


def parse_goaway(payload: bytes) -> tuple[int, int]:
    if len(payload) < 8:
        raise ProtocolError("GOAWAY payload shorter than 8 bytes", FRAME_SIZE_ERROR)
    last, code = _GOAWAY.unpack_from(payload)
    return last & 0x7FFF_FFFF, code


def unpad(payload: bytes, flags: int, *, priority: bool = False) -> bytes:
    """The payload without padding (and, for HEADERS with ``priority``, without the
    priority fields, which the relay does not forward)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise ProtocolError("padded frame with no pad length")
        end -= payload[0]
        start = 1
    if priority and flags & PRIORITY_FLAG:
        start += 5
    if start > end:
        raise ProtocolError("padding longer than the frame")
    return payload[start:end] if (start or end != len(payload)) else payload
