"""The OIP tensor codec: every datatype round trip, every validation error, and a fuzzed decoder."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidArgument
from protos.inference import grpc_service_pb2 as pb
from workers.inference.tensors import (
    DATATYPES,
    BytesTensor,
    TensorSpec,
    decode_input,
    decode_inputs,
    encode_bytes_elements,
    encode_output,
)

InputTensor = pb.ModelInferRequest.InferInputTensor

SAMPLES: dict[str, torch.Tensor] = {
    "BOOL": torch.tensor([[True, False, True]]),
    "UINT8": torch.tensor([[0, 7, 255]], dtype=torch.uint8),
    "UINT16": torch.tensor([[0, 7, 65535]], dtype=torch.uint16),
    "UINT32": torch.tensor([[0, 7, 2**32 - 1]], dtype=torch.uint32),
    "UINT64": torch.from_numpy(np.array([[0, 7, 2**64 - 1]], dtype=np.uint64)),
    "INT8": torch.tensor([[-128, 0, 127]], dtype=torch.int8),
    "INT16": torch.tensor([[-32768, 0, 32767]], dtype=torch.int16),
    "INT32": torch.tensor([[-(2**31), 0, 2**31 - 1]], dtype=torch.int32),
    "INT64": torch.tensor([[-(2**63), 0, 2**63 - 1]], dtype=torch.int64),
    "FP16": torch.tensor([[-1.5, 0.0, 65504.0]], dtype=torch.float16),
    "BF16": torch.tensor([[-1.5, 0.0, 3.0e38]], dtype=torch.bfloat16),
    "FP32": torch.tensor([[-1.5, 0.0, 3.25]], dtype=torch.float32),
    "FP64": torch.tensor([[-1.5, 0.0, 1e300]], dtype=torch.float64),
}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality, for dtypes whose comparison ops torch may not implement."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.contiguous().view(torch.uint8).tolist() == b.contiguous().view(torch.uint8).tolist()
    )


def raw_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_raw_contents_round_trip_every_fixed_size_datatype(datatype: str) -> None:
    sample = SAMPLES[datatype]
    spec = TensorSpec("t", datatype, (3,))
    wire = InputTensor(name="t", datatype=datatype, shape=[1, 3])
    decoded = decode_input(wire, raw_of(sample), spec, max_batch_size=4)
    assert isinstance(decoded, torch.Tensor)
    assert same(decoded, sample)
    meta, raw = encode_output("t", decoded)
    assert (meta.datatype, list(meta.shape), raw) == (datatype, [1, 3], raw_of(sample))


@pytest.mark.parametrize(
    "datatype", [d for d, t in DATATYPES.items() if t.contents_field and d != "BYTES"]
)
def test_typed_contents_decode_to_the_same_tensor_as_raw(datatype: str) -> None:
    sample = SAMPLES[datatype]
    field = DATATYPES[datatype].contents_field
    assert field is not None
    wire = InputTensor(name="t", datatype=datatype, shape=[1, 3])
    getattr(wire.contents, field).extend(sample.reshape(-1).tolist())
    decoded = decode_input(wire, None, TensorSpec("t", datatype, (3,)), max_batch_size=4)
    assert isinstance(decoded, torch.Tensor) and same(decoded, sample)


def test_bytes_raw_and_typed_decode_and_encode_length_prefixed() -> None:
    values = (b"", b"hello", b"\x00\xff")
    raw = (
        struct.pack("<I", 0) + struct.pack("<I", 5) + b"hello" + struct.pack("<I", 2) + b"\x00\xff"
    )
    assert encode_bytes_elements(values) == raw
    spec = TensorSpec("s", "BYTES", (1,))
    wire = InputTensor(name="s", datatype="BYTES", shape=[3, 1])
    assert decode_input(wire, raw, spec, 8) == BytesTensor(values, (3, 1))
    wire.contents.bytes_contents.extend(values)
    assert decode_input(wire, None, spec, 8) == BytesTensor(values, (3, 1))
    meta, encoded = encode_output("s", BytesTensor(values, (3, 1)))
    assert (meta.datatype, list(meta.shape), encoded) == ("BYTES", [3, 1], raw)


def test_zero_sized_tensor_decodes() -> None:
    wire = InputTensor(name="t", datatype="FP32", shape=[2, 0])
    decoded = decode_input(wire, b"", TensorSpec("t", "FP32", (-1,)), 4)
    assert isinstance(decoded, torch.Tensor) and decoded.shape == (2, 0)


SPEC = TensorSpec("x", "FP32", (-1, 4))


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("FP99", [1, 2, 4], b"", r"input 'x': unknown datatype 'FP99'"),
        (
            "INT32",
            [1, 2, 4],
            bytes(32),
            r"input 'x': datatype INT32 does not match the model's FP32",
        ),
        (
            "FP32",
            [1, 2, 5],
            bytes(40),
            r"input 'x': shape \[1, 2, 5\] does not match .*\[-1, -1, 4\]",
        ),
        ("FP32", [2, 4], bytes(32), r"input 'x': shape \[2, 4\] does not match"),
        ("FP32", [], b"", r"input 'x': shape \[\] has no batch dimension"),
        ("FP32", [9, 1, 4], bytes(144), r"input 'x': batch size 9 exceeds max_batch_size 8"),
        ("FP32", [0, 1, 4], b"", r"input 'x': batch size must be at least 1"),
        ("FP32", [1, -1, 4], b"", r"input 'x': shape .* negative dimension"),
        ("FP32", [1, 2, 4], bytes(31), r"input 'x': raw contents are 31 bytes, .* needs 32"),
        ("FP32", [1, 2**40, 4], bytes(16), r"input 'x': raw contents are 16 bytes"),
    ],
)
def test_bad_inputs_are_invalid_argument_naming_the_tensor(
    datatype: str, shape: list[int], raw: bytes, message: str
) -> None:
    wire = InputTensor(name="x", datatype=datatype, shape=shape)
    with pytest.raises(InvalidArgument, match=message):
        decode_input(wire, raw, SPEC, max_batch_size=8)


@pytest.mark.parametrize(
    ("shape", "raw", "message"),
    [
        ([1, 2], encode_bytes_elements([b"ab"]), r"hold 1 elements, shape declares 2"),
        ([1, 2], encode_bytes_elements([b"ab"]) + b"\x01", r"end inside a length prefix"),
        ([1, 1], encode_bytes_elements([b"a", b"b"]), r"hold more than the 1 elements"),
        ([1, 2], struct.pack("<I", 9) + b"x", r"declares 9 bytes but only 1 remain"),
    ],
)
def test_malformed_raw_bytes_are_rejected(shape: list[int], raw: bytes, message: str) -> None:
    tensor = InputTensor(name="b", datatype="BYTES", shape=shape)
    with pytest.raises(InvalidArgument, match=f"input 'b': .*{message}"):
        decode_input(tensor, raw, TensorSpec("b", "BYTES", (-1,)), 4)


def test_typed_contents_errors() -> None:
    spec = TensorSpec("t", "INT8", (2,))
    wire = InputTensor(name="t", datatype="INT8", shape=[1, 2])
    wire.contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidArgument, match=r"input 't': a value is out of range for INT8"):
        decode_input(wire, None, spec, 4)
    wire = InputTensor(name="t", datatype="INT8", shape=[1, 2])
    wire.contents.int64_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match=r"input 't': .*carried in int_contents, not int64"):
        decode_input(wire, None, spec, 4)
    wire = InputTensor(name="t", datatype="INT8", shape=[1, 2])
    wire.contents.int_contents.extend([1])
    with pytest.raises(InvalidArgument, match=r"holds 1 elements, shape \[1, 2\] needs 2"):
        decode_input(wire, None, spec, 4)
    half = InputTensor(name="h", datatype="FP16", shape=[1, 2])
    half.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidArgument, match=r"input 'h': FP16 has no typed contents"):
        decode_input(half, None, TensorSpec("h", "FP16", (2,)), 4)


def request_with(*inputs: InputTensor, raws: list[bytes] | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", inputs=list(inputs))
    request.raw_input_contents.extend(raws or [])
    return request


def test_request_level_errors() -> None:
    specs = {"a": TensorSpec("a", "FP32", (2,)), "b": TensorSpec("b", "FP32", (2,))}
    a = InputTensor(name="a", datatype="FP32", shape=[1, 2])
    b = InputTensor(name="b", datatype="FP32", shape=[2, 2])
    c = InputTensor(name="c", datatype="FP32", shape=[1, 2])
    with pytest.raises(InvalidArgument, match=r"missing input 'b'"):
        decode_inputs(request_with(a, raws=[bytes(8)]), specs, 4)
    with pytest.raises(InvalidArgument, match=r"unknown input 'c'; the model takes a, b"):
        decode_inputs(request_with(a, c, raws=[bytes(8), bytes(8)]), specs, 4)
    with pytest.raises(InvalidArgument, match=r"inputs disagree on the batch size"):
        decode_inputs(request_with(a, b, raws=[bytes(8), bytes(16)]), specs, 4)
    with pytest.raises(InvalidArgument, match=r"1 raw_input_contents for 2 inputs"):
        decode_inputs(request_with(a, b, raws=[bytes(8)]), specs, 4)
    with pytest.raises(InvalidArgument, match=r"input 'a' is given twice"):
        decode_inputs(request_with(a, a, raws=[bytes(8), bytes(8)]), specs, 4)
    typed = InputTensor(name="a", datatype="FP32", shape=[1, 2])
    typed.contents.fp32_contents.extend([1.0, 2.0])
    b1 = InputTensor(name="b", datatype="FP32", shape=[1, 2])
    with pytest.raises(
        InvalidArgument, match=r"input 'a': has typed contents while the request uses raw"
    ):
        decode_inputs(request_with(typed, b1, raws=[bytes(8), bytes(8)]), specs, 4)


def test_raw_bool_must_be_zero_or_one() -> None:
    wire = InputTensor(name="m", datatype="BOOL", shape=[1, 2])
    with pytest.raises(InvalidArgument, match=r"input 'm': raw BOOL contents must be bytes 0 or 1"):
        decode_input(wire, b"\x01\x02", TensorSpec("m", "BOOL", (2,)), 4)


FUZZ_SPECS = {
    "x": TensorSpec("x", "FP32", (-1, 2)),
    "s": TensorSpec("s", "BYTES", (-1,)),
    "i": TensorSpec("i", "INT8", (3,)),
}


def decode_wire(data: bytes) -> None:
    """The worker's path for untrusted bytes: parse, then decode; only clean errors may leave."""
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return
    # Only INVALID_ARGUMENT may come out: anything else would be a crash.
    with contextlib.suppress(InvalidArgument):
        decode_inputs(request, FUZZ_SPECS, max_batch_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_any_bytes_give_a_clean_error_or_tensors(data: bytes) -> None:
    decode_wire(data)


def wire_request(tensors: list[tuple[str, str, list[int]]], raws: list[bytes]) -> bytes:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raws)
    return request.SerializeToString()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["x", "s", "i", "zz"]),
            st.sampled_from([*DATATYPES, "NOPE"]),
            st.lists(st.integers(min_value=-3, max_value=2**62), max_size=4),
        ),
        max_size=3,
    ),
    st.lists(st.binary(max_size=64), max_size=3),
)
def test_fuzz_structured_requests_never_crash_or_allocate_wildly(
    tensors: list[tuple[str, str, list[int]]], raws: list[bytes]
) -> None:
    # Huge declared shapes must fail on the size check before anything is allocated.
    decode_wire(wire_request(tensors, raws))
