"""The mesh's gRPC methods: call kind and idempotency, from the compiled protobuf descriptors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool

# Imported for their side effect: registering the services in the default pool.
from protos.inference import grpc_service_pb2
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2

_FILES = (grpc_service_pb2, data_pb2, training_pb2)
#: Every service the gateway proxies (and answers reflection for).
MESH_SERVICES: tuple[str, ...] = tuple(
    service.full_name
    for module in _FILES
    for service in module.DESCRIPTOR.services_by_name.values()
)

#: Methods safe to send twice: reads, and writes whose repetition changes nothing.
#: A method may also declare ``option idempotency_level`` in its .proto.
IDEMPOTENT: frozenset[str] = frozenset(
    {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/inference.GRPCInferenceService/ModelReady",
        "/inference.GRPCInferenceService/ServerMetadata",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelConfig",
        "/inference.GRPCInferenceService/ModelStatistics",
        "/inference.GRPCInferenceService/RepositoryIndex",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        "/meshserve.data.v1.DataService/GetDataset",
        "/meshserve.data.v1.DataService/ListDatasets",
        "/meshserve.data.v1.DataService/StreamBatches",
        "/meshserve.training.v1.TrainingService/GetJob",
        "/meshserve.training.v1.TrainingService/ListJobs",
        "/meshserve.training.v1.TrainingService/CancelJob",
        "/meshserve.training.v1.TrainingService/WatchJob",
        "/meshserve.training.v1.TrainingService/Evaluate",
    }
)


_OIP = "/inference.GRPCInferenceService/"
#: Triton's shared-memory extension. The gateway answers these itself (it forwards the
#: system ones to the workers on its host, and refuses CUDA's), whether or not the
#: compiled protos declare them.
SHARED_MEMORY_METHODS: frozenset[str] = frozenset(
    {"SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister"}
)
CUDA_SHARED_MEMORY_METHODS: frozenset[str] = frozenset(
    {"CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"}
)
#: Calls about the whole inference server, not one inference: a gateway answers them for
#: the fleet (gateway/fleet.py: each goes to every worker, the answers merged), as one
#: Triton server would. Relayed to one worker they would act on, or describe, that worker
#: only.
FLEET_METHODS: frozenset[str] = frozenset(
    _OIP + name
    for name in (
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "RepositoryIndex",
        "ModelStatistics",
        "ModelReady",
        *SHARED_MEMORY_METHODS,
        *CUDA_SHARED_MEMORY_METHODS,
    )
)


@dataclass(frozen=True)
class MethodInfo:
    path: str
    client_streaming: bool
    server_streaming: bool
    idempotent: bool


@cache
def lookup(path: str) -> MethodInfo | None:
    """What the gateway must know to proxy ``/pkg.Service/Method``; None if not a mesh method."""
    if not path.startswith("/") or path.count("/") != 2:
        return None
    service_name, method_name = path[1:].split("/")
    if service_name not in MESH_SERVICES:
        return None
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return None
    method = service.methods_by_name.get(method_name)
    if method is None:
        return None
    level = method.GetOptions().idempotency_level
    declared = level in (
        descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
        descriptor_pb2.MethodOptions.IDEMPOTENT,
    )
    return MethodInfo(
        path=path,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
        idempotent=declared or path in IDEMPOTENT,
    )
