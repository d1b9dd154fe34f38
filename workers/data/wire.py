"""Translation between ``meshserve.data.v1`` messages and the data service's domain types.

Clients use it too: :func:`tensor_from_array` and :func:`arrays_from_batch` are the
supported way to put numpy arrays on the wire and take batches off it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from mesh.errors import InvalidArgument
from protos.meshserve.data.v1 import data_pb2 as pb
from workers.data import builtin
from workers.data.manifest import DatasetInfo
from workers.data.schema import Array, DType, RawTensor, Schema, Task, TensorSpec
from workers.data.splits import EpochRequest, SplitKind, SplitSpec
from workers.data.standardize import FeatureStats
from workers.data.storage import UploadHeader

_DTYPE_TO_PB = {d: pb.DataType.Value(f"DATA_TYPE_{d.value}") for d in DType}
_DTYPE_FROM_PB = {v: k for k, v in _DTYPE_TO_PB.items()}
_TASK_TO_PB = {
    Task.UNSPECIFIED: pb.TASK_UNSPECIFIED,
    Task.CLASSIFICATION: pb.TASK_CLASSIFICATION,
    Task.REGRESSION: pb.TASK_REGRESSION,
}
_TASK_FROM_PB = {v: k for k, v in _TASK_TO_PB.items()}
#: Default size of one upload message: well under any server's message limit.
UPLOAD_MESSAGE_BYTES = 4 * 1024 * 1024

_SPLIT_FROM_PB = {
    pb.SPLIT_TRAIN: SplitKind.TRAIN,
    pb.SPLIT_VALIDATION: SplitKind.VALIDATION,
    pb.SPLIT_TEST: SplitKind.TEST,
    pb.SPLIT_ALL: SplitKind.ALL,
}


# -- tensors ---------------------------------------------------------------------------


def dtype_from_pb(value: int, where: str) -> DType:
    dtype: DType | None = _DTYPE_FROM_PB.get(value)  # type: ignore[call-overload]
    if dtype is None:
        raise InvalidArgument(f"{where}: data_type must be set (got {value})")
    return dtype


def dtype_to_pb(dtype: DType) -> pb.DataType.ValueType:
    return _DTYPE_TO_PB[dtype]


def raw_tensor(tensor: pb.Tensor) -> RawTensor:
    return RawTensor(
        name=tensor.name,
        dtype=_DTYPE_FROM_PB.get(tensor.data_type),
        shape=tuple(tensor.shape),
        data=tensor.raw_data,
    )


def tensor_from_array(name: str, array: Array, dtype: DType | None = None) -> pb.Tensor:
    """A wire tensor from a numpy array (``dtype`` is needed only for BF16 bit patterns)."""
    kind = dtype or DType.from_numpy(array.dtype)
    data = np.ascontiguousarray(array, dtype=kind.numpy)
    return pb.Tensor(
        name=name, data_type=dtype_to_pb(kind), shape=list(data.shape), raw_data=data.tobytes()
    )


def array_from_tensor(tensor: pb.Tensor) -> Array:
    """A read-only numpy array viewing a wire tensor's bytes."""
    dtype = dtype_from_pb(tensor.data_type, f"tensor {tensor.name!r}")
    return np.frombuffer(tensor.raw_data, dtype=dtype.numpy).reshape(tuple(tensor.shape))


def arrays_from_batch(batch: pb.Batch) -> dict[str, Array]:
    """A streamed batch's tensors as numpy arrays keyed by column name."""
    return {t.name: array_from_tensor(t) for t in batch.tensors}


# -- schema and headers -------------------------------------------------------------------


def spec_from_pb(spec: pb.TensorSpec, role: str) -> TensorSpec:
    dtype = dtype_from_pb(spec.data_type, f"{role} column {spec.name!r}")
    return TensorSpec(spec.name, dtype, tuple(int(d) for d in spec.shape))


def spec_to_pb(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, data_type=dtype_to_pb(spec.dtype), shape=list(spec.shape))


def schema_from_pb(schema: pb.Schema) -> Schema:
    task = _TASK_FROM_PB.get(schema.task)
    if task is None:
        raise InvalidArgument(f"unknown task {schema.task}")
    return Schema(
        features=tuple(spec_from_pb(s, "feature") for s in schema.features),
        labels=tuple(spec_from_pb(s, "label") for s in schema.labels),
        task=task,
        num_classes=schema.num_classes,
    )


def schema_to_pb(schema: Schema) -> pb.Schema:
    return pb.Schema(
        features=[spec_to_pb(s) for s in schema.features],
        labels=[spec_to_pb(s) for s in schema.labels],
        task=_TASK_TO_PB[schema.task],
        num_classes=schema.num_classes,
    )


def split_from_pb(split: pb.SplitSpec) -> SplitSpec:
    return SplitSpec.of(split.validation_fraction, split.test_fraction, split.seed)


def split_to_pb(split: SplitSpec) -> pb.SplitSpec:
    return pb.SplitSpec(
        validation_fraction=split.validation_fraction,
        test_fraction=split.test_fraction,
        seed=split.seed,
    )


def header_from_pb(header: pb.DatasetHeader) -> UploadHeader:
    return UploadHeader(
        name=header.name,
        version=header.version,
        schema=schema_from_pb(header.schema),
        split=split_from_pb(header.split),
        description=header.description,
        source="upload",
    )


def builtin_from_pb(request: pb.CreateBuiltinDatasetRequest) -> builtin.Source:
    """The generator a request names; proto zeros become the generator's defaults."""
    kind = request.WhichOneof("source")
    if kind == "blobs":
        b = request.blobs
        return builtin.Blobs(
            b.num_examples,
            b.num_classes or builtin.Blobs.num_classes,
            b.num_features or builtin.Blobs.num_features,
            b.cluster_std or builtin.Blobs.cluster_std,
        )
    if kind == "spirals":
        s = request.spirals
        noise = s.noise if s.HasField("noise") else builtin.Spirals.noise
        return builtin.Spirals(s.num_examples, s.num_classes or builtin.Spirals.num_classes, noise)
    if kind == "regression":
        r = request.regression
        noise = r.noise if r.HasField("noise") else builtin.Regression.noise
        return builtin.Regression(
            r.num_examples, r.num_features or builtin.Regression.num_features, noise
        )
    if kind == "digits":
        return builtin.Digits()
    raise InvalidArgument("source must be set: blobs, spirals, regression or digits")


# -- metadata and streaming ---------------------------------------------------------------


def _stats_to_pb(stats: FeatureStats) -> pb.FeatureStats:
    return pb.FeatureStats(name=stats.name, mean=list(stats.mean), std=list(stats.std))


def dataset_to_pb(info: DatasetInfo) -> pb.Dataset:
    created = Timestamp()
    created.FromDatetime(info.created_at)
    return pb.Dataset(
        name=info.name,
        version=info.version,
        schema=schema_to_pb(info.schema),
        num_examples=info.num_examples,
        num_train=info.num_train,
        num_validation=info.num_validation,
        num_test=info.num_test,
        sha256=info.sha256,
        created_at=created,
        size_bytes=info.size_bytes,
        description=info.description,
        source=info.source,
        feature_stats=[_stats_to_pb(s) for s in info.feature_stats],
        split=split_to_pb(info.split),
    )


def epoch_request_from_pb(request: pb.StreamBatchesRequest) -> EpochRequest:
    split = _SPLIT_FROM_PB.get(request.split)
    if split is None:
        got = (
            pb.Split.Name(request.split) if request.split == pb.SPLIT_UNSPECIFIED else request.split
        )
        raise InvalidArgument(
            f"split must be SPLIT_TRAIN, SPLIT_VALIDATION, SPLIT_TEST or SPLIT_ALL, got {got}"
        )
    return EpochRequest(
        split=split,
        batch_size=request.batch_size,
        shuffle=request.shuffle,
        seed=request.seed,
        epoch=request.epoch,
        drop_last=request.drop_last,
        num_shards=max(request.num_shards, 1),
        shard_index=request.shard_index,
    )


def batch_to_pb(
    index: int, ids: Sequence[int] | Array, columns: Mapping[str, Array], types: Mapping[str, DType]
) -> pb.Batch:
    return pb.Batch(
        index=index,
        size=len(ids),
        tensors=[tensor_from_array(name, a, types[name]) for name, a in columns.items()],
        example_ids=[int(i) for i in ids],
    )


def upload_requests(
    header: pb.DatasetHeader,
    columns: Mapping[str, Array],
    *,
    records_per_message: int | None = None,
    message_bytes: int = UPLOAD_MESSAGE_BYTES,
    types: Mapping[str, DType] | None = None,
) -> Iterator[pb.CreateDatasetRequest]:
    """The CreateDataset stream for in-memory arrays: the header, then chunks.

    Chunks hold ``records_per_message`` records, or by default as many as fit
    in about ``message_bytes``, so large examples never exceed a message limit.
    """
    yield pb.CreateDatasetRequest(header=header)
    total = len(next(iter(columns.values())))
    if records_per_message is None:
        record_bytes = sum(a[:1].nbytes for a in columns.values())
        records_per_message = max(1, message_bytes // max(1, record_bytes))
    for start in range(0, total, records_per_message):
        stop = min(start + records_per_message, total)
        yield pb.CreateDatasetRequest(
            chunk=pb.RecordChunk(
                tensors=[
                    tensor_from_array(name, a[start:stop], (types or {}).get(name))
                    for name, a in columns.items()
                ]
            )
        )
