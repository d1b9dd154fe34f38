"""The GRPCInferenceService servicer: protobuf in, one call to the worker core, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from mesh.balance.preload import PRELOAD_HEADER, SERVABLE_HEADER, format_versions, parse_preload
from mesh.errors import FailedPrecondition, InvalidArgument, MeshError, NotFound, Unimplemented
from mesh.server.app import Service
from mesh.server.h2_front import HotMethod
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from workers.inference.load_parameters import config_override
from workers.inference.reporting import ReportSampler
from workers.inference.versions import VERSION_HEADER, parse_version
from workers.inference.worker import InferenceWorker

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "meshserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = (
    "model_repository",
    "model_configuration",
    "statistics",
    "schedule_policy",
    "system_shared_memory",
)
#: Why CudaSharedMemory* answer UNIMPLEMENTED: what a CUDA region would need.
CUDA_SHARED_MEMORY_MISSING = (
    "CUDA shared memory is not supported: the worker does not open CUDA IPC handles "
    "(cudaIpcOpenMemHandle), so it cannot map a client's device memory; use system shared "
    "memory (SystemSharedMemoryRegister) or send tensors in the request"
)

Context = grpc.aio.ServicerContext[Any, Any]


def _header(context: Context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else v
    return None


def _timeout(context: Context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the Open Inference Protocol (Triton's superset) from an :class:`InferenceWorker`."""

    def __init__(self, worker: InferenceWorker) -> None:
        self.worker = worker
        self.repository = worker.repository
        self.ready = False
        #: ModelInfer responses carry the load report only now and then (see reporting).
        self.sampler = ReportSampler()
        #: The sidecar's preload (versions, or None: all), once sent (mesh/balance/preload.py).
        self.preload_request: asyncio.Future[frozenset[tuple[str, int]] | None] = (
            asyncio.get_running_loop().create_future()
        )

    def _report_load(self, context: Context, extra: tuple[tuple[str, str], ...] = ()) -> None:
        context.set_trailing_metadata(self.worker.load_report().metadata() + extra)

    def _take_preload(self, text: str) -> None:
        """The sidecar's list of the versions the ring gives this worker (validated)."""
        if not self.repository.awaiting_preload or self.preload_request.done():
            raise FailedPrecondition("the worker is not waiting for a preload")
        try:
            owned = parse_preload(text)
        except ValueError as exc:
            raise InvalidArgument(f"{PRELOAD_HEADER}: {exc}") from None
        self.preload_request.set_result(owned)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        preload = _header(context, PRELOAD_HEADER)
        if preload is not None:
            self._take_preload(preload)
        extra: tuple[tuple[str, str], ...] = ()
        if self.repository.awaiting_preload and not self.preload_request.done():
            servable = self.repository.servable_versions()
            versions = [(name, v) for name, numbers in servable.items() for v in numbers]
            extra = ((SERVABLE_HEADER, format_versions(versions)),)
        self._report_load(context, extra)
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        self._report_load(context)
        return pb.ModelReadyResponse(ready=self.repository.is_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        state, _ = self.repository.resolve(request.name, request.version)
        assert state.signature is not None and state.config is not None  # resolve checked it
        signature = state.signature
        response = pb.ModelMetadataResponse(
            name=state.name,
            versions=[str(v) for v in self.repository.ready_versions(state.name)],
            platform=signature.platform,
        )
        for spec in signature.inputs:
            response.inputs.add(
                name=spec.name,
                datatype=spec.datatype,
                shape=spec.full_shape(signature.max_batch_size),
            )
        for spec in signature.outputs:
            response.outputs.add(
                name=spec.name,
                datatype=spec.datatype,
                shape=spec.full_shape(signature.max_batch_size),
            )
        return response

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        state, _ = self.repository.resolve(request.name, request.version)
        return pb.ModelConfigResponse(config=state.config)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        try:
            return await self.worker.infer(
                request, _header(context, VERSION_HEADER), _timeout(context)
            )
        finally:
            if self.sampler.due(self.worker.loaded_state()):
                self._report_load(context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest | Undecodable], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Runs the stream's requests concurrently (so they can batch); answers as each finishes.

        A failed request yields an ``error_message`` and the stream goes on, as in Triton.
        """
        header = _header(context, VERSION_HEADER)
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                response = await self.worker.infer(request, header, _timeout(context))
                await results.put(pb.ModelStreamInferResponse(infer_response=response))
            except MeshError as exc:
                await results.put(_stream_error(request, exc.message))
            except Exception as exc:
                ref = uuid.uuid4().hex[:12]
                log.error("stream request failed (ref %s)", ref, exc_info=exc)
                await results.put(_stream_error(request, f"internal error (ref {ref})"))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    if isinstance(request, Undecodable):
                        await results.put(
                            pb.ModelStreamInferResponse(error_message=request.message)
                        )
                        continue
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                await results.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                yield item
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        names = [request.name] if request.name else self.repository.names()
        keys: list[tuple[str, int]] = []
        for name in names:
            state = self.repository.state(name)
            versions = sorted(state.servable | state.ready)
            if request.version:
                wanted = parse_version(name, request.version)
                if wanted not in versions:
                    raise NotFound(f"model {name!r} has no version {wanted}")
                versions = [wanted]
            keys.extend((name, v) for v in versions)
        return pb.ModelStatisticsResponse(model_stats=self.worker.stats.snapshot(keys))

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.repository.index(request.ready):
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        config = config_override(request.model_name, request.parameters)
        await self.repository.load(request.model_name, config)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.worker.shared_memory.status(request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name,
                    key=region.key,
                    offset=region.offset,
                    byte_size=region.byte_size,
                )
            )
        return response

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.worker.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.worker.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Context
    ) -> pb.CudaSharedMemoryStatusResponse:
        raise Unimplemented(CUDA_SHARED_MEMORY_MISSING)

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Context
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise Unimplemented(CUDA_SHARED_MEMORY_MISSING)

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        raise Unimplemented(CUDA_SHARED_MEMORY_MISSING)

    def service(self) -> Service:
        return Service(SERVICE_NAME, self.register)

    def hot_methods(self) -> list[HotMethod]:
        """ModelInfer and ModelStreamInfer for the HTTP/2 front (mesh/server/h2_front.py):
        the same behaviours and parsers grpc.aio is given in :meth:`register`."""
        return [
            HotMethod(
                f"/{SERVICE_NAME}/ModelInfer",
                _lenient(pb.ModelInferRequest),
                pb.ModelInferResponse.SerializeToString,
                _refusing_undecodable(self.ModelInfer),
            ),
            HotMethod(
                f"/{SERVICE_NAME}/ModelStreamInfer",
                _lenient(pb.ModelInferRequest),
                pb.ModelStreamInferResponse.SerializeToString,
                self.ModelStreamInfer,
                streaming=True,
            ),
        ]

    def register(self, server: grpc.aio.Server) -> None:
        """Mounts every RPC with a lenient parser (see :class:`Undecodable`).

        Same methods and wire names as ``add_GRPCInferenceServiceServicer_to_server``.
        """
        descriptor = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in descriptor.methods:
            request_type = getattr(pb, method.input_type.name)
            response_type = getattr(pb, method.output_type.name)
            behaviour = getattr(self, method.name)
            options: dict[str, Any] = {
                "request_deserializer": _lenient(request_type),
                "response_serializer": response_type.SerializeToString,
            }
            if method.client_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(behaviour, **options)
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _refusing_undecodable(behaviour), **options
                )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(descriptor.full_name, handlers)]
        )


class Undecodable:
    """A request body that did not parse.

    grpc answers a deserializer's exception with UNKNOWN and an error log; parsing
    leniently lets the servicer answer INVALID_ARGUMENT, as for any bad input.
    """

    def __init__(self, type_name: str) -> None:
        self.message = f"request body is not a valid {type_name}"


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(name)

    return parse


def _refusing_undecodable(
    behaviour: Callable[[Any, Context], Awaitable[Any]],
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handler(request: Any, context: Context) -> Any:
        if isinstance(request, Undecodable):
            raise InvalidArgument(request.message)
        return await behaviour(request, context)

    return handler


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    # The id and model let a client match the error to its request on a shared stream.
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
