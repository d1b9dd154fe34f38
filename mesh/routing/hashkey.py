"""Hash keys from a header (Istio) or from request fields read by a partial protobuf decode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Protobuf wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10
#: What a hash key says for an empty model_version: the highest ready version.
LATEST = "latest"
#: Methods whose request names the model in field 1 and its version in field 2: only for
#: these does a rule's ``x-meshserve.model`` match read the message (others' field 1 is
#: something else, e.g. RepositoryModelLoadRequest's repository_name).
MODEL_NAMED_METHODS: frozenset[str] = frozenset(
    f"/inference.GRPCInferenceService/{name}"
    for name in (
        "ModelInfer",
        "ModelStreamInfer",
        "ModelReady",
        "ModelMetadata",
        "ModelConfig",
        "ModelStatistics",
    )
)


@dataclass(frozen=True)
class RequestFields:
    """Fields 1 and 2 of ModelInferRequest (also ModelReady/ModelMetadataRequest)."""

    model_name: str = ""
    model_version: str = ""

    def get(self, name: str) -> str:
        return self.model_name if name == "model_name" else self.model_version


def _varint(data: bytes | memoryview, offset: int) -> tuple[int, int] | None:
    """(value, next offset), or None when truncated or longer than 10 bytes."""
    value = shift = 0
    for index in range(offset, min(offset + _MAX_VARINT_BYTES, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return None


def read_fields(message: bytes | memoryview) -> RequestFields | None:
    """Reads model_name (1) and model_version (2) from a serialized request's prefix.

    Walks the wire format and stops at the first field that is neither, so the tensors
    that follow (fields 4-7, possibly megabytes) are never touched. Serializers write
    fields in number order, so for their output this equals a full decode. Returns None
    for bytes that are not a well-formed prefix (bad varint, length past the end, a
    wrong wire type for 1 or 2, a string that is not UTF-8): the caller then routes
    without a field key instead of failing the call.
    """
    view = memoryview(message) if not isinstance(message, memoryview) else message
    values: dict[int, str] = {}
    offset = 0
    end = len(view)
    while offset < end:
        key = view[offset]
        if key < 0x80:  # a one-byte tag, as fields 1 and 2 always have: no call
            offset += 1
        else:
            tag = _varint(view, offset)
            if tag is None:
                return None
            key, offset = tag
        number, wire_type = key >> 3, key & 7
        if number not in (1, 2):
            # Field 0 and unknown wire types are malformed; anything else ends the prefix.
            if number == 0 or wire_type not in (_VARINT, _I64, _LEN, 3, 4, _I32):
                return None
            break
        if wire_type != _LEN:
            return None
        size = view[offset] if offset < end else 0x80
        if size < 0x80:  # a name or version under 128 bytes: a one-byte length
            offset += 1
        else:
            length = _varint(view, offset)
            if length is None:
                return None
            size, offset = length
        if offset + size > end:
            return None
        try:
            # A repeated occurrence replaces the earlier one, as a full decode does.
            values[number] = str(view[offset : offset + size], "utf-8")
        except UnicodeDecodeError:
            return None
        offset += size
    return RequestFields(values.get(1, ""), values.get(2, ""))


@dataclass(frozen=True)
class HashKey:
    """The key placed on the ring and where it came from (for ``route explain``)."""

    key: str
    source: str


def hash_key(
    *,
    header_name: str | None,
    fields: Sequence[str],
    headers: Mapping[str, str],
    request_fields: RequestFields | None,
) -> HashKey | None:
    """The hash key of a request under a destination's policy, or None when it has none.

    Fields win when the request carries them (a model name is present): the key is
    ``name/version``, where an empty version takes the header's value when the policy
    names a header (a canary sets ``x-model-version`` and the worker honours it), and
    otherwise ``latest``. Without fields the header's value is the key, as in Istio.
    """
    if fields and request_fields is not None and request_fields.model_name:
        parts = []
        version_source = ""
        for name in fields:
            value = request_fields.get(name)
            if name == "model_version" and not value:
                header_value = headers.get(header_name, "") if header_name else ""
                if header_value:
                    value, version_source = header_value, f" (version from header {header_name})"
                else:
                    value = LATEST
            parts.append(value)
        return HashKey("/".join(parts), f"fields {'+'.join(fields)}{version_source}")
    if header_name:
        header_key = headers.get(header_name)
        if header_key:
            return HashKey(header_key, f"header {header_name}")
    return None
