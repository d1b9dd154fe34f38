"""Validation of names, schemas and uploaded chunks (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.errors import InvalidArgument
from workers.data.schema import (
    DType,
    RawTensor,
    Schema,
    Task,
    TensorSpec,
    decode_chunk,
    validate_name,
    validate_schema,
)

SCHEMA = Schema(
    features=(TensorSpec("x", DType.FP32, (3,)),),
    labels=(TensorSpec("y", DType.INT64, ()),),
    task=Task.CLASSIFICATION,
    num_classes=4,
)


def raw(name: str, array: np.ndarray, dtype: DType | None = None) -> RawTensor:
    kind = dtype or DType.from_numpy(array.dtype)
    return RawTensor(name, kind, tuple(array.shape), array.astype(kind.numpy).tobytes())


def good(n: int = 2) -> list[RawTensor]:
    return [
        raw("x", np.zeros((n, 3), np.float32)),
        raw("y", np.arange(n, dtype=np.int64) % 4),
    ]


def test_decode_returns_arrays_in_schema_order() -> None:
    arrays = decode_chunk(SCHEMA, list(reversed(good(3))), first_record=0)
    assert list(arrays) == ["x", "y"]
    assert arrays["x"].shape == (3, 3) and arrays["y"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            [raw("x", np.zeros((2, 3), np.float64)), raw("y", np.zeros(2, np.int64))],
            "record 10: tensor 'x' has dtype FP64, schema says FP32",
        ),
        (
            [raw("x", np.zeros((2, 4), np.float32)), raw("y", np.zeros(2, np.int64))],
            "record 10: tensor 'x' has shape [2, 4], schema says [N, 3]",
        ),
        (
            [raw("x", np.zeros((2, 3), np.float32)), raw("y", np.zeros((2, 1), np.int64))],
            "record 10: tensor 'y' has shape [2, 1], schema says [N]",
        ),
        ([raw("x", np.zeros((2, 3), np.float32))], "tensor 'y' is missing"),
        ([*good(), raw("z", np.zeros(2, np.int64))], "tensor 'z' is not in the schema"),
        ([*good(), raw("y", np.zeros(2, np.int64))], "tensor 'y' appears twice"),
        (
            [raw("x", np.zeros((2, 3), np.float32)), raw("y", np.zeros(3, np.int64))],
            "tensor 'y' has 3 records, but the chunk's other tensors have 2",
        ),
        (
            [raw("x", np.zeros((2, 3), np.float32)), raw("y", np.array([0, 9], np.int64))],
            "record 11: label 'y' = 9 is outside [0, 4)",
        ),
        (
            [
                RawTensor("x", DType.FP32, (2, 3), b"\0" * 20),
                raw("y", np.zeros(2, np.int64)),
            ],
            "tensor 'x' has 20 bytes of raw data, shape [2, 3] of FP32 needs 24",
        ),
        (
            [RawTensor("x", None, (2, 3), b"\0" * 24), raw("y", np.zeros(2, np.int64))],
            "tensor 'x' has dtype unspecified",
        ),
    ],
)
def test_bad_chunks_name_the_record_and_tensor(tensors: list[RawTensor], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_chunk(SCHEMA, tensors, first_record=10)
    assert message in info.value.message


def test_bool_bytes_must_be_zero_or_one() -> None:
    schema = Schema((TensorSpec("flag", DType.BOOL, ()),), ())
    ok = decode_chunk(schema, [RawTensor("flag", DType.BOOL, (2,), b"\x00\x01")], 0)
    assert ok["flag"].tolist() == [False, True]
    with pytest.raises(InvalidArgument, match="record 6: tensor 'flag' holds a BOOL byte"):
        decode_chunk(schema, [RawTensor("flag", DType.BOOL, (2,), b"\x01\x07")], 5)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 129, "spaced name", "-lead"])
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidArgument, match="dataset name"):
        validate_name(name)


def test_valid_names_pass() -> None:
    for name in ("digits", "mnist-v2", "a.b_c", "7"):
        assert validate_name(name) == name


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (Schema((), ()), "at least one feature"),
        (
            Schema((TensorSpec("x", DType.FP32, ()), TensorSpec("x", DType.FP32, ())), ()),
            "'x' appears twice",
        ),
        (Schema((TensorSpec("x", DType.FP32, (0,)),), ()), "dimensions must be >= 1"),
        (Schema((TensorSpec("bad name", DType.FP32, ()),), ()), "column name 'bad name'"),
        (
            Schema(
                (TensorSpec("x", DType.FP32, ()),),
                (TensorSpec("y", DType.INT64, ()),),
                Task.CLASSIFICATION,
                1,
            ),
            "num_classes >= 2",
        ),
        (
            Schema(
                (TensorSpec("x", DType.FP32, ()),),
                (TensorSpec("y", DType.FP32, ()),),
                Task.CLASSIFICATION,
                3,
            ),
            "must have an integer type",
        ),
        (
            Schema((TensorSpec("x", DType.FP32, ()),), (), Task.REGRESSION, 3),
            "only meaningful for classification",
        ),
    ],
)
def test_invalid_schemas_are_rejected(schema: Schema, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_schema(schema)


def test_dtypes_are_little_endian_and_round_trip_from_numpy() -> None:
    for dtype in DType:
        assert dtype.numpy.byteorder in ("<", "|", "=")
        if dtype is not DType.BF16:
            assert DType.from_numpy(dtype.numpy) is dtype
    assert DType.from_numpy(np.dtype(">f4")) is DType.FP32
    with pytest.raises(InvalidArgument, match="complex"):
        DType.from_numpy(np.complex64)
