"""The fleet answers as one Triton server: the gateway fans model control out to every worker.

A relayed call reaches one worker, which is right for inference and wrong for the calls
that change or describe the whole server: unloading a model on one of two workers leaves
the other serving it, and statistics depend on where a call lands. The relay hands these
calls (:data:`FLEET_METHODS`) to the gateway's own gRPC server, where this servicer sends
each to every inference worker over the mesh's mutual TLS (through their sidecars, as any
mesh call) and answers once, merged by :mod:`gateway.fleet_merge`.

Request bytes are forwarded as they came (parameters such as Load's ``config`` override
pass through untouched), each worker call bounded by the caller's remaining deadline, so
one slow worker cannot hold the answer past it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from gateway.fleet_merge import (
    Failure,
    Reply,
    any_ready,
    control,
    failed,
    merge_index,
    merge_raw_status,
    merge_statistics,
)
from mesh.errors import MeshError, Unimplemented
from mesh.routing.methods import FLEET_METHODS, SHARED_MEMORY_METHODS
from mesh.routing.state import GatewayState
from mesh.server.app import Service
from protos.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
Parse = Callable[[bytes], Any]

#: Without a caller's deadline: loads read and warm models (slow), the rest is bookkeeping.
CONTROL_TIMEOUT_S = 300.0
READ_TIMEOUT_S = 10.0
#: Each worker call ends this much before the caller's deadline, so the merged answer
#: (naming the slow worker) reaches the caller before its own deadline does.
MARGIN_FRACTION = 0.1
MARGIN_MAX_S = 1.0
_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


class FleetError(MeshError):
    """A merged answer that is an error, with the status the merge chose."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.code = failure.code


def _check(result: T | Failure) -> T:
    if isinstance(result, Failure):
        raise FleetError(result)
    return result


def host_of(address: str) -> str:
    """``host`` of ``host:port`` / ``[v6]:port``."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def is_local(address: str, local_addresses: frozenset[str]) -> bool:
    """Whether an endpoint runs on this host: a loopback address or name, or one of the
    host's own addresses (shared memory is visible only there)."""
    host = host_of(address)
    if host in _LOOPBACK_NAMES or host in local_addresses:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def own_addresses() -> frozenset[str]:
    """This host's addresses by its name (a sidecar registered with its host address)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


class FleetServicer:
    """Answers :data:`FLEET_METHODS` for the inference workers the gateway knows."""

    def __init__(
        self,
        state: GatewayState,
        *,
        credentials: Callable[[], grpc.ChannelCredentials] | None = None,
        host: str = "inference",
        local_addresses: frozenset[str] | None = None,
    ) -> None:
        self.state = state
        #: Mutual TLS to the sidecars (the gateway's mesh identity); None: plaintext.
        self.credentials = credentials
        self.host = host
        self._local = own_addresses() if local_addresses is None else local_addresses

    # -- whom to ask -------------------------------------------------------------------------

    def workers(self) -> list[str]:
        """Every worker serving the host (registered SERVING; ejected ones included: they
        still hold models, and a load or unload must reach them)."""
        return sorted(e.address for e in self.state.snapshot.endpoints(self.host) if e.healthy)

    def routable(self) -> list[str]:
        """The workers a call can be routed to now (not ejected by outlier detection)."""
        cluster = self.state.clusters.cluster(self.host)
        excluded = cluster.excluded()
        return [a for a in cluster.healthy if a not in excluded]

    def local_workers(self) -> list[str]:
        return [a for a in self.workers() if is_local(a, self._local)]

    # -- fan-out -----------------------------------------------------------------------------

    async def fan_out(
        self,
        method: str,
        request: bytes,
        workers: Sequence[str],
        context: Context,
        *,
        parse: Parse | None,
        default_timeout: float,
    ) -> list[Reply[Any]]:
        """Sends ``request`` to each worker at once; one reply per worker, in order."""
        if not workers:
            raise FleetError(
                Failure(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no {self.host} worker is registered and serving to answer {method}",
                )
            )
        remaining = context.time_remaining()
        budget = default_timeout if remaining is None or remaining > 1e8 else remaining
        budget = max(budget - min(budget * MARGIN_FRACTION, MARGIN_MAX_S), 0.001)
        path = f"/{SERVICE}/{method}"
        return list(
            await asyncio.gather(
                *(self._call(worker, path, request, budget, parse) for worker in workers)
            )
        )

    async def _call(
        self, worker: str, path: str, request: bytes, timeout: float, parse: Parse | None
    ) -> Reply[Any]:
        # A channel per call: control calls are rare, and a fresh channel presents the
        # gateway's current certificate after a rotation.
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if self.credentials is not None:
            channel = grpc.aio.secure_channel(worker, self.credentials(), options=options)
        else:
            channel = grpc.aio.insecure_channel(worker, options=options)
        try:
            # Bytes in, bytes out: the request is forwarded as it came.
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            answer: bytes = await call(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            message = exc.details() or code.name
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                message = f"no answer within {timeout:.3g} s ({message})"
            return Reply(worker, code=code, message=message)
        finally:
            await channel.close()
        try:
            value = parse(answer) if parse is not None else answer
        except Exception:
            return Reply(
                worker, code=grpc.StatusCode.INTERNAL, message="answered an unreadable message"
            )
        return Reply(worker, value=value)

    # -- methods -----------------------------------------------------------------------------

    async def RepositoryModelLoad(self, request: bytes, context: Context) -> bytes:
        return await self._control("RepositoryModelLoad", "load", request, context)

    async def RepositoryModelUnload(self, request: bytes, context: Context) -> bytes:
        return await self._control("RepositoryModelUnload", "unload", request, context)

    async def _control(self, method: str, action: str, request: bytes, context: Context) -> bytes:
        # Load and Unload requests share their field numbers (model_name = 2).
        model = pb.RepositoryModelLoadRequest.FromString(request).model_name
        replies = await self.fan_out(
            method, request, self.workers(), context, parse=None, default_timeout=CONTROL_TIMEOUT_S
        )
        trouble = control(replies, action, model)
        if trouble is not None:
            raise FleetError(trouble)
        return b""  # both responses are empty messages

    async def RepositoryIndex(self, request: bytes, context: Context) -> bytes:
        replies = await self.fan_out(
            "RepositoryIndex",
            request,
            self.workers(),
            context,
            parse=pb.RepositoryIndexResponse.FromString,
            default_timeout=READ_TIMEOUT_S,
        )
        if not any(r.ok for r in replies):
            raise FleetError(_check_failed(replies, "RepositoryIndex"))
        return merge_index(replies).SerializeToString()

    async def ModelStatistics(self, request: bytes, context: Context) -> bytes:
        name = pb.ModelStatisticsRequest.FromString(request).name
        replies = await self.fan_out(
            "ModelStatistics",
            request,
            self.workers(),
            context,
            parse=pb.ModelStatisticsResponse.FromString,
            default_timeout=READ_TIMEOUT_S,
        )
        return _check(merge_statistics(replies, name)).SerializeToString()

    async def ModelReady(self, request: bytes, context: Context) -> bytes:
        replies = await self.fan_out(
            "ModelReady",
            request,
            self.routable(),
            context,
            parse=pb.ModelReadyResponse.FromString,
            default_timeout=READ_TIMEOUT_S,
        )
        return pb.ModelReadyResponse(ready=_check(any_ready(replies))).SerializeToString()

    async def _shared_memory(self, method: str, request: bytes, context: Context) -> bytes:
        replies = await self.fan_out(
            method,
            request,
            self.local_workers(),
            context,
            parse=None,
            default_timeout=READ_TIMEOUT_S,
        )
        if method == "SystemSharedMemoryStatus":
            return _check(merge_raw_status(replies))
        trouble = failed(replies, method)
        if trouble is not None:
            raise FleetError(trouble)
        return b""  # Register and Unregister answer empty messages

    async def _cuda(self, method: str, request: bytes, context: Context) -> bytes:
        raise Unimplemented(
            f"CUDA shared memory is not supported by meshserve: {method} needs CUDA IPC "
            "handles shared between the client and a worker's GPU, which the mesh does not "
            "pass between processes; register system shared memory "
            "(SystemSharedMemoryRegister) instead, or send tensors in the request"
        )

    # -- mounting ----------------------------------------------------------------------------

    def behaviour(self, method: str) -> Callable[[bytes, Context], Awaitable[bytes]]:
        if method.startswith("CudaSharedMemory"):
            return lambda request, context: self._cuda(method, request, context)
        if method in SHARED_MEMORY_METHODS:
            return lambda request, context: self._shared_memory(method, request, context)
        found: Callable[[bytes, Context], Awaitable[bytes]] = getattr(self, method)
        return found

    def register(self, server: grpc.aio.Server) -> None:
        """Mounts every fleet method as bytes in, bytes out (no re-encoding of requests)."""
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            path.rsplit("/", 1)[1]: grpc.unary_unary_rpc_method_handler(
                self.behaviour(path.rsplit("/", 1)[1])
            )
            for path in FLEET_METHODS
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])

    def service(self) -> Service:
        return Service(SERVICE, self.register)


def _check_failed(replies: Sequence[Reply[Any]], what: str) -> Failure:
    trouble = failed(replies, what)
    assert trouble is not None
    return trouble
