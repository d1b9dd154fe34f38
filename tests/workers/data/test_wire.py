"""Protobuf translation: tensors round-trip little-endian, uploads split by bytes."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.errors import InvalidArgument
from protos.meshserve.data.v1 import data_pb2 as pb
from workers.data import wire
from workers.data.schema import Array, DType


@pytest.mark.parametrize("dtype", [d for d in DType if d is not DType.BF16], ids=lambda d: d.value)
def test_tensors_round_trip_every_type(dtype: DType) -> None:
    array = (np.arange(12) % 2).astype(dtype.numpy).reshape(3, 4)
    tensor = wire.tensor_from_array("t", array)
    assert tensor.data_type == wire.dtype_to_pb(dtype)
    assert list(tensor.shape) == [3, 4]
    assert np.array_equal(wire.array_from_tensor(tensor), array)


def test_big_endian_input_goes_on_the_wire_little_endian() -> None:
    array = np.array([1, 2], dtype=">i4")
    tensor = wire.tensor_from_array("t", array)
    assert tensor.raw_data == b"\x01\x00\x00\x00\x02\x00\x00\x00"


def test_bf16_travels_as_bit_patterns() -> None:
    bits = np.array([0x3F80], dtype="<u2")
    tensor = wire.tensor_from_array("t", bits, DType.BF16)
    assert tensor.data_type == pb.DATA_TYPE_BF16 and tensor.raw_data == b"\x80\x3f"


def test_unspecified_dtype_is_rejected_when_decoding() -> None:
    with pytest.raises(InvalidArgument, match="data_type must be set"):
        wire.array_from_tensor(pb.Tensor(name="t", shape=[1], raw_data=b"\0"))


def test_upload_messages_are_sized_by_bytes_by_default() -> None:
    columns: dict[str, Array] = {
        "x": np.zeros((100, 256), np.float32),
        "y": np.zeros(100, np.int64),
    }
    requests = list(wire.upload_requests(pb.DatasetHeader(name="d"), columns, message_bytes=10_000))
    assert requests[0].HasField("header")
    chunks = [r.chunk for r in requests[1:]]
    # 1032 bytes per record: 9 records fit in 10,000 bytes.
    assert [c.tensors[0].shape[0] for c in chunks] == [9] * 11 + [1]
    assert all(c.ByteSize() <= 10_000 + 100 for c in chunks)
