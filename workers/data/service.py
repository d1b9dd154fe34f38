"""The DataService servicer: protobuf in, one domain call off the event loop, protobuf out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from mesh.errors import InvalidArgument
from mesh.server.app import Service
from protos.meshserve.data.v1 import data_pb2 as pb
from protos.meshserve.data.v1 import data_pb2_grpc
from workers.data import builtin, wire
from workers.data.manifest import DatasetInfo
from workers.data.schema import DType, RawTensor, decode_chunk
from workers.data.splits import Indices, SplitSpec, plan_epoch
from workers.data.standardize import output_dtype
from workers.data.storage import DatasetStore, DatasetWriter, UploadHeader

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DataService"].full_name

Context = grpc.aio.ServicerContext[Any, Any]


class DataServicer(data_pb2_grpc.DataServiceServicer):
    """Serves one :class:`DatasetStore`. Blocking I/O and numpy work run in threads."""

    def __init__(self, store: DatasetStore) -> None:
        self.store = store

    async def CreateDataset(
        self, request_iterator: AsyncIterator[pb.CreateDatasetRequest], context: Context
    ) -> pb.Dataset:
        writer: DatasetWriter | None = None
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("item")
                if kind == "header":
                    if writer is not None:
                        raise InvalidArgument("an upload has exactly one header, got a second")
                    header = wire.header_from_pb(request.header)
                    writer = await asyncio.to_thread(self.store.begin, header)
                elif kind == "chunk":
                    if writer is None:
                        raise InvalidArgument("the first message of an upload must be a header")
                    tensors = [wire.raw_tensor(t) for t in request.chunk.tensors]
                    await asyncio.to_thread(_append, writer, tensors)
                else:
                    raise InvalidArgument("each upload message must hold a header or a chunk")
            if writer is None:
                raise InvalidArgument("empty upload: send a header, then record chunks")
            info = await asyncio.to_thread(writer.commit)
            return wire.dataset_to_pb(info)
        finally:
            if writer is not None:
                # Runs on error and on cancellation alike; shielded so that a
                # second cancellation cannot leave staging files behind.
                await asyncio.shield(asyncio.to_thread(writer.abort))

    async def CreateBuiltinDataset(
        self, request: pb.CreateBuiltinDatasetRequest, context: Context
    ) -> pb.Dataset:
        source = wire.builtin_from_pb(request)
        split = wire.split_from_pb(request.split)
        info = await asyncio.to_thread(
            _create_builtin, self.store, request.name, request.version, source, request.seed, split
        )
        return wire.dataset_to_pb(info)

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.Dataset:
        info = await asyncio.to_thread(self.store.get, request.name, request.version)
        return wire.dataset_to_pb(info)

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        infos = await asyncio.to_thread(self.store.list, request.name)
        return pb.ListDatasetsResponse(datasets=[wire.dataset_to_pb(i) for i in infos])

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: Context
    ) -> pb.DeleteDatasetResponse:
        await asyncio.to_thread(self.store.delete, request.name, request.version)
        return pb.DeleteDatasetResponse()

    async def StreamBatches(
        self, request: pb.StreamBatchesRequest, context: Context
    ) -> AsyncIterator[pb.Batch]:
        epoch = wire.epoch_request_from_pb(request)
        info = await asyncio.to_thread(self.store.get, request.dataset, request.version)
        plan = await asyncio.to_thread(plan_epoch, info.num_examples, info.split, epoch)
        types = {spec.name: spec.dtype for spec in info.schema.columns}
        if request.standardize:
            types |= {spec.name: output_dtype(spec.dtype) for spec in info.schema.features}
        for index, ids in enumerate(plan):
            batch = await asyncio.to_thread(
                _read_batch, self.store, info, ids, index, request.standardize, types
            )
            yield batch


def _append(writer: DatasetWriter, tensors: list[RawTensor]) -> None:
    writer.append(decode_chunk(writer.schema, tensors, writer.num_records))


def _create_builtin(
    store: DatasetStore,
    name: str,
    version: str,
    source: builtin.Source,
    seed: int,
    split: SplitSpec,
) -> DatasetInfo:
    # Refuse a bad or taken name before spending time generating.
    store.ensure_free(name, version)
    generated = builtin.generate(source, seed)
    header = UploadHeader(
        name=name,
        version=version,
        schema=generated.schema,
        split=split,
        description=generated.description,
        source=generated.source,
    )
    return store.create(header, generated.columns)


def _read_batch(
    store: DatasetStore,
    info: DatasetInfo,
    ids: Indices,
    index: int,
    standardized: bool,
    types: dict[str, DType],
) -> pb.Batch:
    columns = store.read_examples(info, ids, standardized=standardized)
    return wire.batch_to_pb(index, ids, columns, types)


def data_service(store: DatasetStore) -> Service:
    """The DataService, ready to mount with :func:`mesh.server.app.start_server`."""
    servicer = DataServicer(store)
    return Service(
        SERVICE_NAME,
        lambda server: data_pb2_grpc.add_DataServiceServicer_to_server(servicer, server),
    )
