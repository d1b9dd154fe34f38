"""The DataService servicer: protobuf in, one domain call off the event loop, protobuf out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from mesh.errors import InvalidArgument, ResourceExhausted
from mesh.server.app import DEFAULT_MAX_MESSAGE_BYTES, Service
from protos.meshserve.data.v1 import data_pb2 as pb
from protos.meshserve.data.v1 import data_pb2_grpc
from workers.data import builtin, wire
from workers.data.manifest import DatasetInfo
from workers.data.schema import DType, RawTensor, decode_chunk
from workers.data.splits import Indices, SplitSpec, plan_epoch, windows
from workers.data.standardize import output_dtype
from workers.data.storage import DatasetStore, DatasetWriter, UploadHeader

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DataService"].full_name

Context = grpc.aio.ServicerContext[Any, Any]

#: StreamBatches reads this many bytes of examples at a time (several batches),
#: so each chunk file is read once per window rather than once per batch.
WINDOW_BYTES = 16 * 1024 * 1024


async def _confirm_not_cancelled(context: Context) -> None:
    """Returns only if the client half-closed the stream; raises if it cancelled it.

    grpc.aio ends the request iterator the same way for both: a client that resets
    the stream (cancel, deadline, lost connection) looks like one that finished
    sending, and the task cancellation follows a moment later. Committing on that
    end of stream published truncated or abandoned uploads whenever the commit
    thread started before the cancellation arrived. By the time the read returned,
    gRPC core has already processed the reset, so one more operation on the call
    settles it: sending the (empty) initial metadata fails on a cancelled call and
    succeeds on a live one.
    """
    await context.send_initial_metadata(())


class DataServicer(data_pb2_grpc.DataServiceServicer):
    """Serves one :class:`DatasetStore`. Blocking I/O and numpy work run in threads."""

    def __init__(
        self, store: DatasetStore, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self.store = store
        self.max_message_bytes = max_message_bytes

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
            await _confirm_not_cancelled(context)
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
        self._check_batch_fits(info, types, epoch.batch_size)
        per_window = max(1, WINDOW_BYTES // max(1, info.schema.example_bytes))
        index = 0
        for window in windows(plan, per_window):
            batches = await asyncio.to_thread(
                _read_window, self.store, info, window, index, request.standardize, types
            )
            for batch in batches:
                yield batch
            index += len(batches)

    def _check_batch_fits(
        self, info: DatasetInfo, types: dict[str, DType], batch_size: int
    ) -> None:
        """Refuses up front a batch that could not be sent, instead of failing mid-stream."""
        per_example = sum(spec.elements * types[spec.name].itemsize for spec in info.schema.columns)
        # Example ids are varints of at most 10 bytes; 1 KiB covers names and framing.
        largest = min(batch_size, info.num_examples) * (per_example + 10) + 1024
        if largest > self.max_message_bytes:
            raise ResourceExhausted(
                f"a batch of {batch_size} examples of {info.name!r} takes about {largest} bytes, "
                f"over this server's message limit of {self.max_message_bytes}: "
                "use a smaller batch_size"
            )


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


def _read_window(
    store: DatasetStore,
    info: DatasetInfo,
    window: list[Indices],
    first_index: int,
    standardized: bool,
    types: dict[str, DType],
) -> list[pb.Batch]:
    read = store.read_batches(info, window, standardized=standardized)
    return [
        wire.batch_to_pb(first_index + i, ids, columns, types)
        for i, (ids, columns) in enumerate(zip(window, read, strict=True))
    ]


def data_service(
    store: DatasetStore, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Service:
    """The DataService, ready to mount with :func:`mesh.server.app.start_server`.

    ``max_message_bytes`` should be the server's limit, so that StreamBatches
    refuses batches that could not be sent.
    """
    servicer = DataServicer(store, max_message_bytes)
    return Service(
        SERVICE_NAME,
        lambda server: data_pb2_grpc.add_DataServiceServicer_to_server(servicer, server),
    )
