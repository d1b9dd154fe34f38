"""Reads the worker's load report (trailing metadata on ServerReady) for the registry."""

from __future__ import annotations

import logging

import grpc
import grpc.aio

from mesh.balance.report import LoadReport
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from registry.instances import Load, ModelRef

log = logging.getLogger(__name__)

#: Short: a probe that stalls must not hold up the next heartbeat.
PROBE_TIMEOUT = 0.5


def model_refs(report: LoadReport) -> tuple[ModelRef, ...]:
    """``name:version`` entries of the report as registry refs (malformed ones skipped)."""
    refs = []
    for entry in report.loaded_versions:
        name, sep, version = entry.rpartition(":")
        if sep and name and version:
            refs.append(ModelRef(name, version))
    return tuple(sorted(refs, key=lambda r: (r.model, r.version)))


def registry_load(report: LoadReport | None, sidecar_in_flight: int) -> Load:
    """What the instance advertises: the worker's own figures when it reports them.

    The worker counts calls from every caller (its sidecar's and any it serves directly);
    the sidecar's count is the floor when the report is missing or older than a burst.
    """
    if report is None:
        return Load(in_flight=sidecar_in_flight)
    return Load(
        in_flight=max(report.in_flight, sidecar_in_flight),
        queue_depth=report.queue_depth,
        memory_bytes=report.memory_bytes,
    )


class LoadProbe:
    """Asks the worker for its load with ``ServerReady`` (cheap: no model is touched).

    Workers that do not speak the Open Inference Protocol answer UNIMPLEMENTED once; the
    probe then stays quiet and the sidecar publishes its own in-flight count alone.
    """

    def __init__(
        self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._metadata = metadata
        self.supported = True

    async def read(self) -> LoadReport | None:
        if not self.supported:
            return None
        call = self._stub.ServerReady(
            pb.ServerReadyRequest(), timeout=PROBE_TIMEOUT, metadata=self._metadata
        )
        try:
            await call
            trailers = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False
                log.info("the worker reports no load (ServerReady unimplemented)")
            return None
        if trailers is None or not any(k.startswith("x-meshserve-") for k, _ in trailers):
            # An OIP server that is not ours (say, Triton): nothing to read, ever.
            self.supported = False
            return None
        try:
            return LoadReport.from_metadata(list(trailers))
        except ValueError as exc:
            log.warning("unreadable load report from the worker: %s", exc)
            return None
