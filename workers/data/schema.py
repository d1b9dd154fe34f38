"""Dataset schemas and the validation of names, schemas and uploaded record chunks."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from mesh.errors import InvalidArgument

#: Names and version labels: they become directory names, so no '/' and no
#: leading '.' (hidden names are the store's temporary files).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Column names are identifiers a model input could carry.
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")

#: A numpy array of any element type (the schema, not the annotation, fixes it).
Array = npt.NDArray[Any]


class DType(Enum):
    """Element types, named as in the Open Inference Protocol.

    BF16 has no numpy type: its arrays hold the raw bit patterns as little-endian
    uint16 (``torch.from_numpy(a).view(torch.bfloat16)`` recovers the values).
    """

    BOOL = "BOOL"
    UINT8 = "UINT8"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    BF16 = "BF16"
    FP32 = "FP32"
    FP64 = "FP64"

    @property
    def numpy(self) -> np.dtype[np.generic]:
        """The little-endian numpy dtype that stores this type."""
        return np.dtype(_NUMPY[self])

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def is_integer(self) -> bool:
        return self in _INTEGERS

    @classmethod
    def from_numpy(cls, dtype: npt.DTypeLike) -> DType:
        """The type of a numpy array; raises InvalidArgument for unsupported ones."""
        kind = np.dtype(dtype)
        for member, code in _NUMPY.items():
            if member is not DType.BF16 and np.dtype(code) == kind.newbyteorder("<"):
                return member
        raise InvalidArgument(f"numpy dtype {kind} has no meshserve data type")


_NUMPY: dict[DType, str] = {
    DType.BOOL: "?",
    DType.UINT8: "u1",
    DType.INT8: "i1",
    DType.INT16: "<i2",
    DType.INT32: "<i4",
    DType.INT64: "<i8",
    DType.FP16: "<f2",
    DType.BF16: "<u2",
    DType.FP32: "<f4",
    DType.FP64: "<f8",
}
_INTEGERS = frozenset({DType.UINT8, DType.INT8, DType.INT16, DType.INT32, DType.INT64})


class Task(Enum):
    """What the labels mean."""

    UNSPECIFIED = "unspecified"
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


@dataclass(frozen=True)
class TensorSpec:
    """One column: its name, element type and the shape of one example."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        """Elements in one example."""
        return math.prod(self.shape)

    @property
    def example_bytes(self) -> int:
        return self.elements * self.dtype.itemsize


@dataclass(frozen=True)
class Schema:
    """The columns of a dataset; build it through :func:`validate_schema`."""

    features: tuple[TensorSpec, ...]
    labels: tuple[TensorSpec, ...]
    task: Task = Task.UNSPECIFIED
    num_classes: int = 0

    @property
    def columns(self) -> tuple[TensorSpec, ...]:
        """Features then labels: the order of columns in chunk files and batches."""
        return self.features + self.labels

    @property
    def example_bytes(self) -> int:
        """Bytes one example takes over all columns."""
        return sum(c.example_bytes for c in self.columns)

    def column(self, name: str) -> TensorSpec:
        for spec in self.columns:
            if spec.name == name:
                return spec
        raise KeyError(name)


@dataclass(frozen=True)
class RawTensor:
    """A tensor as it arrives on the wire: little-endian bytes with type and full shape."""

    name: str
    dtype: DType | None  # None: the client sent DATA_TYPE_UNSPECIFIED
    shape: tuple[int, ...]
    data: bytes


def validate_name(value: str, what: str = "dataset name") -> str:
    """Returns ``value`` if it is a valid name; raises InvalidArgument naming the problem."""
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _validate_spec(spec: TensorSpec, role: str) -> None:
    if not _COLUMN.fullmatch(spec.name):
        raise InvalidArgument(
            f"{role} column name {spec.name!r} is invalid: use letters, digits, '_', '.' or '-', "
            "starting with a letter or '_'"
        )
    if any(d < 1 for d in spec.shape):
        raise InvalidArgument(
            f"{role} column {spec.name!r} has shape {list(spec.shape)}: dimensions must be >= 1"
        )


def validate_schema(schema: Schema) -> Schema:
    """Checks a schema's columns and task; returns it unchanged."""
    if not schema.features:
        raise InvalidArgument("schema must declare at least one feature column")
    seen: set[str] = set()
    for role, specs in (("feature", schema.features), ("label", schema.labels)):
        for spec in specs:
            _validate_spec(spec, role)
            if spec.name in seen:
                raise InvalidArgument(f"column name {spec.name!r} appears twice in the schema")
            seen.add(spec.name)
    if schema.task is Task.CLASSIFICATION:
        if schema.num_classes < 2:
            raise InvalidArgument(
                f"a classification schema needs num_classes >= 2, got {schema.num_classes}"
            )
        if not schema.labels:
            raise InvalidArgument("a classification schema needs a label column")
        for spec in schema.labels:
            if not spec.dtype.is_integer:
                raise InvalidArgument(
                    f"classification label {spec.name!r} must have an integer type, "
                    f"not {spec.dtype.value}"
                )
    elif schema.num_classes != 0:
        raise InvalidArgument(
            f"num_classes is only meaningful for classification, got {schema.num_classes}"
        )
    return schema


def decode_chunk(
    schema: Schema, tensors: Sequence[RawTensor], first_record: int
) -> dict[str, Array]:
    """Turns one uploaded chunk into arrays, checking it against the schema.

    ``first_record`` is the index of the chunk's first record in the whole upload;
    errors name the records they concern so a client can find the bad input.
    Returns one array per schema column, in schema order, all with the same
    leading dimension.
    """
    by_name: dict[str, RawTensor] = {}
    for sent in tensors:
        if sent.name in by_name:
            raise InvalidArgument(
                f"chunk at record {first_record}: tensor {sent.name!r} appears twice"
            )
        by_name[sent.name] = sent
    expected = {spec.name for spec in schema.columns}
    unknown = sorted(set(by_name) - expected)
    if unknown:
        raise InvalidArgument(
            f"chunk at record {first_record}: tensor {unknown[0]!r} is not in the schema"
        )
    arrays: dict[str, Array] = {}
    for spec in schema.columns:
        tensor = by_name.get(spec.name)
        if tensor is None:
            raise InvalidArgument(
                f"chunk at record {first_record}: tensor {spec.name!r} is missing"
            )
        count = len(next(iter(arrays.values()))) if arrays else None
        arrays[spec.name] = _decode_column(spec, tensor, first_record, count)
        _check_values(schema, spec, arrays[spec.name], first_record)
    return arrays


def _decode_column(
    spec: TensorSpec, tensor: RawTensor, first_record: int, count: int | None
) -> Array:
    """One column of a chunk; ``count`` is the record count of the columns before it."""
    where = f"record {first_record}: tensor {spec.name!r}"
    if tensor.dtype is not spec.dtype:
        got = tensor.dtype.value if tensor.dtype else "unspecified"
        raise InvalidArgument(f"{where} has dtype {got}, schema says {spec.dtype.value}")
    if not tensor.shape or tuple(tensor.shape[1:]) != spec.shape:
        declared = ", ".join(["N", *map(str, spec.shape)])
        raise InvalidArgument(f"{where} has shape {list(tensor.shape)}, schema says [{declared}]")
    n = tensor.shape[0]
    if n < 1:
        raise InvalidArgument(f"{where} has no records (leading dimension {n})")
    if count is not None and n != count:
        raise InvalidArgument(
            f"{where} has {n} records, but the chunk's other tensors have {count}"
        )
    size = n * spec.example_bytes
    if len(tensor.data) != size:
        raise InvalidArgument(
            f"{where} has {len(tensor.data)} bytes of raw data, shape "
            f"{list(tensor.shape)} of {spec.dtype.value} needs {size}"
        )
    return np.frombuffer(tensor.data, dtype=spec.dtype.numpy).reshape(tensor.shape)


def _check_values(schema: Schema, spec: TensorSpec, array: Array, first_record: int) -> None:
    """Rejects values the type or task rules out, naming the first bad record."""
    rows = array.reshape(array.shape[0], -1)
    if spec.dtype is DType.BOOL:
        raw = rows.view(np.uint8)
        bad = np.flatnonzero((raw > 1).any(axis=1))
        if bad.size:
            raise InvalidArgument(
                f"record {first_record + int(bad[0])}: tensor {spec.name!r} holds a BOOL "
                "byte other than 0 or 1"
            )
    if schema.task is Task.CLASSIFICATION and spec in schema.labels:
        outside = (rows < 0) | (rows >= schema.num_classes)
        bad = np.flatnonzero(outside.any(axis=1))
        if bad.size:
            row = int(bad[0])
            value = rows[row][outside[row]][0]
            raise InvalidArgument(
                f"record {first_record + row}: label {spec.name!r} = {value} is outside "
                f"[0, {schema.num_classes})"
            )


def columns_from_arrays(
    features: Mapping[str, Array], labels: Mapping[str, Array]
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Column specs that describe the given arrays (leading dimension = examples)."""

    def specs(arrays: Mapping[str, Array]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(name, DType.from_numpy(a.dtype), tuple(int(d) for d in a.shape[1:]))
            for name, a in arrays.items()
        )

    return specs(features), specs(labels)
