"""Open Inference Protocol tensor codec: wire datatypes and contents <-> torch tensors, validated.

Pure: no I/O, no model. Every error is an :class:`InvalidArgument` that names the tensor,
so a client can fix its request; nothing in here may raise anything else on bad input
(the decoder is fuzzed to hold to that).
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mesh.errors import InvalidArgument
from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc

# Raw contents are little-endian on the wire; torch/numpy buffers are host order.
if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("meshserve's tensor codec needs a little-endian host")

BYTES = "BYTES"


@dataclass(frozen=True)
class DataType:
    """One OIP datatype: its torch dtype, element size and typed-contents field."""

    name: str
    torch_dtype: torch.dtype | None  # None for BYTES, which has no fixed-size element
    itemsize: int  # 0 for BYTES
    #: The ``InferTensorContents`` field that carries it, or None where only raw is allowed.
    contents_field: str | None
    numpy_dtype: Any = None


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        DataType("BOOL", torch.bool, 1, "bool_contents", np.bool_),
        DataType("UINT8", torch.uint8, 1, "uint_contents", np.uint8),
        DataType("UINT16", torch.uint16, 2, "uint_contents", np.uint16),
        DataType("UINT32", torch.uint32, 4, "uint_contents", np.uint32),
        DataType("UINT64", torch.uint64, 8, "uint64_contents", np.uint64),
        DataType("INT8", torch.int8, 1, "int_contents", np.int8),
        DataType("INT16", torch.int16, 2, "int_contents", np.int16),
        DataType("INT32", torch.int32, 4, "int_contents", np.int32),
        DataType("INT64", torch.int64, 8, "int64_contents", np.int64),
        # Half types have no typed field in the protocol: raw only (as in Triton).
        DataType("FP16", torch.float16, 2, None),
        DataType("BF16", torch.bfloat16, 2, None),
        DataType("FP32", torch.float32, 4, "fp32_contents", np.float32),
        DataType("FP64", torch.float64, 8, "fp64_contents", np.float64),
        DataType(BYTES, None, 0, "bytes_contents"),
    )
}
_BY_TORCH = {d.torch_dtype: d.name for d in DATATYPES.values() if d.torch_dtype is not None}

#: model_config.proto's DataType enum -> OIP datatype name (TYPE_STRING is BYTES).
CONFIG_DATATYPES: dict[int, str] = {
    mc.TYPE_BOOL: "BOOL",
    mc.TYPE_UINT8: "UINT8",
    mc.TYPE_UINT16: "UINT16",
    mc.TYPE_UINT32: "UINT32",
    mc.TYPE_UINT64: "UINT64",
    mc.TYPE_INT8: "INT8",
    mc.TYPE_INT16: "INT16",
    mc.TYPE_INT32: "INT32",
    mc.TYPE_INT64: "INT64",
    mc.TYPE_FP16: "FP16",
    mc.TYPE_BF16: "BF16",
    mc.TYPE_FP32: "FP32",
    mc.TYPE_FP64: "FP64",
    mc.TYPE_STRING: BYTES,
}


@dataclass(frozen=True)
class BytesTensor:
    """A BYTES tensor: its elements in row-major order and its shape."""

    values: tuple[bytes, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if math.prod(self.shape) != len(self.values):
            raise ValueError(f"{len(self.values)} elements do not fill shape {list(self.shape)}")


Tensor = torch.Tensor | BytesTensor


def shape_of(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def datatype_of(tensor: Tensor) -> str:
    if isinstance(tensor, BytesTensor):
        return BYTES
    try:
        return _BY_TORCH[tensor.dtype]
    except KeyError:
        raise InvalidArgument(
            f"torch dtype {tensor.dtype} has no Open Inference datatype"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """A declared model input or output: name, datatype and dims (-1 = any size).

    ``dims`` exclude the batch dimension of a batching model, as in Triton's config.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]

    @classmethod
    def from_config(cls, name: str, data_type: int, dims: Iterable[int]) -> TensorSpec:
        try:
            datatype = CONFIG_DATATYPES[data_type]
        except KeyError:
            raise InvalidArgument(
                f"tensor {name!r}: unsupported config data_type {data_type}"
            ) from None
        return cls(name, datatype, tuple(int(d) for d in dims))

    def full_shape(self, max_batch_size: int) -> list[int]:
        """The shape a client sees: with a leading -1 batch dim when the model batches."""
        return [-1, *self.dims] if max_batch_size > 0 else list(self.dims)


def _check_shape(
    name: str, shape: Sequence[int], spec: TensorSpec | None, max_batch_size: int
) -> None:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension")
    if spec is None:
        return
    expected = spec.full_shape(max_batch_size)
    if max_batch_size > 0:
        if not shape:
            raise InvalidArgument(
                f"input {name!r}: shape [] has no batch dimension; expected {expected}"
            )
        if shape[0] < 1:
            raise InvalidArgument(f"input {name!r}: batch size must be at least 1, got {shape[0]}")
        if shape[0] > max_batch_size:
            raise InvalidArgument(
                f"input {name!r}: batch size {shape[0]} exceeds max_batch_size {max_batch_size}"
            )
    if len(shape) != len(expected) or any(
        e != -1 and e != s for e, s in zip(expected, shape, strict=True)
    ):
        raise InvalidArgument(
            f"input {name!r}: shape {list(shape)} does not match the model's {expected}"
        )


def decode_bytes_elements(name: str, raw: bytes, count: int) -> tuple[bytes, ...]:
    """Splits raw BYTES contents: each element is a 4-byte LE length, then the bytes."""
    values: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if len(values) == count:
            raise InvalidArgument(
                f"input {name!r}: raw BYTES contents hold more than the {count} elements "
                "its shape declares"
            )
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: raw BYTES contents end inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(
                f"input {name!r}: BYTES element {len(values)} declares {length} bytes "
                f"but only {len(raw) - offset} remain"
            )
        values.append(bytes(view[offset : offset + length]))
        offset += length
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: raw BYTES contents hold {len(values)} elements, "
            f"shape declares {count}"
        )
    return tuple(values)


def encode_bytes_elements(values: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _from_raw(name: str, dt: DataType, shape: tuple[int, ...], raw: bytes) -> Tensor:
    count = math.prod(shape)
    if dt.torch_dtype is None:
        return BytesTensor(decode_bytes_elements(name, raw, count), shape)
    expected = count * dt.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input {name!r}: raw contents are {len(raw)} bytes, but shape {list(shape)} "
            f"of {dt.name} needs {expected}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dt.torch_dtype)
    # bytearray: torch.frombuffer needs a writable buffer, and the copy lets the
    # request message go as soon as it is decoded.
    tensor = torch.frombuffer(bytearray(raw), dtype=dt.torch_dtype).reshape(shape)
    if dt.name == "BOOL" and bool((tensor.view(torch.uint8) > 1).any()):
        raise InvalidArgument(f"input {name!r}: raw BOOL contents must be bytes 0 or 1")
    return tensor


def _present_fields(contents: pb.InferTensorContents) -> list[str]:
    return [f.name for f, _ in contents.ListFields()]


def _from_typed(
    name: str, dt: DataType, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> Tensor:
    count = math.prod(shape)
    present = _present_fields(contents)
    if dt.contents_field is None:
        raise InvalidArgument(
            f"input {name!r}: {dt.name} has no typed contents field; send it in raw_input_contents"
        )
    stray = [f for f in present if f != dt.contents_field]
    if stray:
        raise InvalidArgument(
            f"input {name!r}: datatype {dt.name} is carried in {dt.contents_field}, "
            f"not {', '.join(stray)}"
        )
    values = getattr(contents, dt.contents_field)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: {dt.contents_field} holds {len(values)} elements, "
            f"shape {list(shape)} needs {count}"
        )
    if dt.torch_dtype is None:
        return BytesTensor(tuple(values), shape)
    try:
        array = np.asarray(list(values), dtype=dt.numpy_dtype)
    except OverflowError:
        raise InvalidArgument(f"input {name!r}: a value is out of range for {dt.name}") from None
    return torch.from_numpy(array.reshape(shape))


def decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    spec: TensorSpec | None,
    max_batch_size: int,
) -> Tensor:
    """Decodes one request input, checking it against ``spec`` (None: only self-consistency).

    ``raw`` is the input's entry of ``raw_input_contents`` when the request uses raw
    contents, else None.
    """
    name = tensor.name
    dt = DATATYPES.get(tensor.datatype)
    if dt is None:
        raise InvalidArgument(
            f"input {name!r}: unknown datatype {tensor.datatype!r}; expected one of "
            f"{', '.join(DATATYPES)}"
        )
    if spec is not None and dt.name != spec.datatype:
        raise InvalidArgument(
            f"input {name!r}: datatype {dt.name} does not match the model's {spec.datatype}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    _check_shape(name, shape, spec, max_batch_size)
    if raw is not None:
        if tensor.HasField("contents") and _present_fields(tensor.contents):
            raise InvalidArgument(
                f"input {name!r}: has typed contents while the request uses "
                "raw_input_contents; use one or the other"
            )
        return _from_raw(name, dt, shape, raw)
    return _from_typed(name, dt, shape, tensor.contents)


def decode_inputs(
    request: pb.ModelInferRequest, specs: Mapping[str, TensorSpec], max_batch_size: int
) -> dict[str, Tensor]:
    """Decodes and validates every input of ``request`` against the model's ``specs``."""
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidArgument(
            f"request has {len(raws)} raw_input_contents for {len(request.inputs)} inputs; "
            "raw contents must be given for every input or none"
        )
    decoded: dict[str, Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in decoded:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"unknown input {tensor.name!r}; the model takes {', '.join(specs) or 'none'}"
            )
        raw = raws[index] if raws else None
        decoded[tensor.name] = decode_input(tensor, raw, spec, max_batch_size)
    missing = [name for name in specs if name not in decoded]
    if missing:
        raise InvalidArgument(f"missing input {', '.join(repr(m) for m in missing)}")
    if max_batch_size > 0:
        batches = {name: shape_of(t)[0] for name, t in decoded.items()}
        if len(set(batches.values())) > 1:
            raise InvalidArgument(f"inputs disagree on the batch size: {batches}")
    return decoded


def encode_output(
    name: str, tensor: Tensor
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """One output as its metadata and its raw contents (outputs are always raw)."""
    shape = list(shape_of(tensor))
    if isinstance(tensor, BytesTensor):
        data = encode_bytes_elements(tensor.values)
        return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=BYTES, shape=shape), data
    datatype = datatype_of(tensor)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # Viewing as bytes keeps every dtype (bf16 and the unsigned ones included) exact.
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape), data
