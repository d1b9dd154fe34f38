"""Hash keys from headers and from request fields (partial protobuf decode, fuzzed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.routing.hashkey import HashKey, RequestFields, hash_key, read_fields
from protos.inference import grpc_service_pb2 as pb


def infer_request(name: str, version: str, **extra: object) -> bytes:
    request = pb.ModelInferRequest(model_name=name, model_version=version, **extra)  # type: ignore[arg-type]
    return request.SerializeToString()


def test_reads_name_and_version_and_stops_before_the_tensors() -> None:
    message = infer_request("resnet", "3", id="req-1", raw_input_contents=[b"\x00" * 1000])
    assert read_fields(message) == RequestFields("resnet", "3")
    # Garbage after the prefix is never read: cut the message right after field 3's tag.
    cut = infer_request("resnet", "3") + b"\x1a" + b"\xff" * 20
    assert read_fields(cut) == RequestFields("resnet", "3")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", RequestFields()),
        (b"\x0a\x00", RequestFields()),  # empty name
        (b"\x12\x01" + b"7", RequestFields("", "7")),  # only a version
        (b"\x0a\x01a\x0a\x01b", RequestFields("b")),  # last occurrence wins
        (b"\x0a\x05abc", None),  # length past the end
        (b"\x0a", None),  # truncated length
        (b"\x08\x01", None),  # field 1 as a varint: wrong wire type
        (b"\x0a\x02\xff\xfe", None),  # not UTF-8
        (b"\x00\x01", None),  # field number 0
        (b"\x0f", None),  # wire type 7 does not exist
        (b"\xff" * 11, None),  # varint longer than 10 bytes
        (b"\x1a\x03abc", RequestFields()),  # starts with another field: nothing to read
    ],
)
def test_partial_decode_table(data: bytes, expected: RequestFields | None) -> None:
    assert read_fields(data) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    result = read_fields(data)
    assert result is None or isinstance(result, RequestFields)


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(max_size=30),
    version=st.text(max_size=10),
    request_id=st.text(max_size=10),
    raw=st.lists(st.binary(max_size=32), max_size=3),
    trailing=st.binary(max_size=16),
)
def test_matches_a_full_decode_for_valid_messages(
    name: str, version: str, request_id: str, raw: list[bytes], trailing: bytes
) -> None:
    message = infer_request(name, version, id=request_id, raw_input_contents=raw)
    full = pb.ModelInferRequest.FromString(message)
    assert read_fields(message) == RequestFields(full.model_name, full.model_version)
    if request_id or raw:
        # Anything may follow the first other field: it is never decoded.
        assert read_fields(message + trailing) == RequestFields(full.model_name, full.model_version)


def test_model_ready_requests_share_the_field_numbers() -> None:
    message = pb.ModelReadyRequest(name="resnet", version="2").SerializeToString()
    assert read_fields(message) == RequestFields("resnet", "2")


FIELDS = ("model_name", "model_version")


@pytest.mark.parametrize(
    ("header_name", "fields", "headers", "request_fields", "expected"),
    [
        (
            "x-model-version",
            (),
            {"x-model-version": "3"},
            None,
            HashKey("3", "header x-model-version"),
        ),
        ("x-model-version", (), {}, None, None),
        ("x-model-version", (), {"x-model-version": ""}, None, None),
        (
            None,
            FIELDS,
            {},
            RequestFields("resnet", "3"),
            HashKey("resnet/3", "fields model_name+model_version"),
        ),
        (
            None,
            FIELDS,
            {},
            RequestFields("resnet", ""),
            HashKey("resnet/latest", "fields model_name+model_version"),
        ),
        (
            "x-model-version",
            FIELDS,
            {"x-model-version": "2"},
            RequestFields("resnet", ""),
            HashKey(
                "resnet/2", "fields model_name+model_version (version from header x-model-version)"
            ),
        ),
        # The request's own version wins over a canary header.
        (
            "x-model-version",
            FIELDS,
            {"x-model-version": "2"},
            RequestFields("resnet", "5"),
            HashKey("resnet/5", "fields model_name+model_version"),
        ),
        # No model name in the message: fall back to the header, as Istio would.
        (
            "x-model-version",
            FIELDS,
            {"x-model-version": "2"},
            RequestFields("", ""),
            HashKey("2", "header x-model-version"),
        ),
        (None, FIELDS, {}, None, None),
        (
            None,
            ("model_name",),
            {},
            RequestFields("resnet", "9"),
            HashKey("resnet", "fields model_name"),
        ),
    ],
)
def test_hash_key_sources(
    header_name: str | None,
    fields: tuple[str, ...],
    headers: dict[str, str],
    request_fields: RequestFields | None,
    expected: HashKey | None,
) -> None:
    assert (
        hash_key(
            header_name=header_name, fields=fields, headers=headers, request_fields=request_fields
        )
        == expected
    )
