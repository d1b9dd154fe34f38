"""Small real gRPC upstreams for gateway tests: they say which worker answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
from google.protobuf.message import Message

from mesh.server.app import Service
from protos.inference import grpc_service_pb2 as pb
from protos.meshserve.data.v1 import data_pb2

INFERENCE = "inference.GRPCInferenceService"
DATA = "meshserve.data.v1.DataService"
Context = grpc.aio.ServicerContext[object, object]


@dataclass
class FakeWorker:
    """An inference + data worker whose replies name it; it can be told to fail."""

    name: str
    #: Status every call fails with, or None to answer.
    fail_with: grpc.StatusCode | None = None
    #: Metadata of every call received, in order.
    seen: list[dict[str, str]] = field(default_factory=list)
    #: Seconds left of the deadline as each call arrived (None: no deadline).
    deadlines: list[float | None] = field(default_factory=list)
    hold: asyncio.Event | None = None
    #: Every request message received, in order (all four call kinds).
    requests: list[Message] = field(default_factory=list)
    #: The client address of every call, in order: one per connection it came on.
    peers: list[str] = field(default_factory=list)

    def _enter(self, context: Context) -> None:
        metadata = {
            m[0]: m[1] for m in (context.invocation_metadata() or ()) if isinstance(m[1], str)
        }
        self.seen.append(metadata)
        self.peers.append(context.peer())
        self.deadlines.append(context.time_remaining())

    async def _maybe_fail(self, context: Context) -> None:
        if self.fail_with is not None:
            await context.abort(self.fail_with, f"{self.name} is failing on purpose")

    def _response(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        version = request.model_version or dict(self.seen[-1]).get("x-model-version", "")
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version=version, id=self.name
        )

    async def model_infer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        self._enter(context)
        self.requests.append(request)
        await self._maybe_fail(context)
        if self.hold is not None:
            await self.hold.wait()
        await context.send_initial_metadata((("x-worker", self.name),))
        context.set_trailing_metadata((("x-trailer", "done"),))
        return self._response(request, context)

    async def server_live(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        self._enter(context)
        return pb.ServerLiveResponse(live=True)

    async def model_stream_infer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        self._enter(context)
        await self._maybe_fail(context)
        async for request in requests:
            self.requests.append(request)
            yield pb.ModelStreamInferResponse(infer_response=self._response(request, context))

    async def stream_batches(
        self, request: data_pb2.StreamBatchesRequest, context: Context
    ) -> AsyncIterator[data_pb2.Batch]:
        self._enter(context)
        self.requests.append(request)
        await self._maybe_fail(context)
        for index in range(request.batch_size):
            # example_ids carries the worker's number, so tests can tell who answered.
            yield data_pb2.Batch(index=index, size=1, example_ids=[int(self.name.lstrip("w") or 0)])

    async def create_dataset(
        self, requests: AsyncIterator[data_pb2.CreateDatasetRequest], context: Context
    ) -> data_pb2.Dataset:
        self._enter(context)
        await self._maybe_fail(context)
        items = [r async for r in requests]
        self.requests.extend(items)
        return data_pb2.Dataset(
            name=items[0].header.name, version=self.name, num_examples=len(items)
        )

    def services(self) -> list[Service]:
        def register(server: grpc.aio.Server) -> None:
            server.add_generic_rpc_handlers(
                [
                    grpc.method_handlers_generic_handler(
                        INFERENCE,
                        {
                            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                                self.model_infer,
                                request_deserializer=pb.ModelInferRequest.FromString,
                                response_serializer=pb.ModelInferResponse.SerializeToString,
                            ),
                            "ServerLive": grpc.unary_unary_rpc_method_handler(
                                self.server_live,
                                request_deserializer=pb.ServerLiveRequest.FromString,
                                response_serializer=pb.ServerLiveResponse.SerializeToString,
                            ),
                            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                                self.model_stream_infer,
                                request_deserializer=pb.ModelInferRequest.FromString,
                                response_serializer=pb.ModelStreamInferResponse.SerializeToString,
                            ),
                        },
                    ),
                    grpc.method_handlers_generic_handler(
                        DATA,
                        {
                            "StreamBatches": grpc.unary_stream_rpc_method_handler(
                                self.stream_batches,
                                request_deserializer=data_pb2.StreamBatchesRequest.FromString,
                                response_serializer=data_pb2.Batch.SerializeToString,
                            ),
                            "CreateDataset": grpc.stream_unary_rpc_method_handler(
                                self.create_dataset,
                                request_deserializer=data_pb2.CreateDatasetRequest.FromString,
                                response_serializer=data_pb2.Dataset.SerializeToString,
                            ),
                        },
                    ),
                ]
            )

        return [Service(INFERENCE, register), Service(DATA, lambda server: None)]


async def _main(name: str) -> None:
    from mesh.server.app import ServerSettings, serve_until_signal, start_server

    serving = await start_server(ServerSettings(), FakeWorker(name).services())
    print(f"{name} listening on {serving.address}", flush=True)
    await serve_until_signal(serving)


if __name__ == "__main__":  # a worker process for multi-process tests
    import sys

    asyncio.run(_main(sys.argv[1]))
