"""The inference worker's domain core: one request in, one response out, with statistics."""

from __future__ import annotations

import time
from collections.abc import Sequence

from mesh.balance.report import LoadReport
from mesh.errors import InvalidArgument, MeshError
from protos.inference import grpc_service_pb2 as pb
from workers.inference.model import ModelError
from workers.inference.repository import ModelRepository
from workers.inference.request_parameters import check_request_parameters, classification_count
from workers.inference.shared_memory import SharedMemoryRegistry
from workers.inference.stats import Statistics
from workers.inference.tensors import decode_inputs, encode_output


class InferenceError(MeshError):
    """The model raised or returned something unusable: INTERNAL with a safe message."""


class InferenceWorker:
    """Runs ModelInfer requests against a :class:`ModelRepository` and keeps the books."""

    def __init__(
        self,
        repository: ModelRepository,
        stats: Statistics,
        shared_memory: SharedMemoryRegistry | None = None,
    ) -> None:
        self.repository = repository
        self.stats = stats
        self.shared_memory = shared_memory or SharedMemoryRegistry()
        self.in_flight = 0

    async def infer(
        self,
        request: pb.ModelInferRequest,
        header_version: str | None = None,
        timeout: float | None = None,
    ) -> pb.ModelInferResponse:
        """Decodes, batches, runs and encodes one request.

        ``timeout`` bounds the wait for a version that is still loading.
        """
        self.in_flight += 1
        started = time.perf_counter_ns()
        version: int | None = None
        ok = False
        try:
            # None unless the request names a shared-memory region (Triton's extension).
            if request.parameters:
                check_request_parameters(request.parameters)
            shared = self.shared_memory.plan(request)
            if shared is not None:
                request = shared.request
            served = await self.repository.acquire(
                request.model_name, request.model_version, header_version, timeout
            )
            model = served.model
            version = model.version
            signature = model.signature
            wanted = _requested_outputs(request, [s.name for s in signature.outputs])
            inputs = decode_inputs(request, signature.input_specs, signature.max_batch_size)
            try:
                outputs = await served.batcher.infer(inputs)
            except ModelError as exc:
                raise InferenceError(str(exc)) from exc
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=str(version), id=request.id
            )
            for name in wanted:
                tensor, raw = encode_output(name, outputs[name])
                response.outputs.append(tensor)
                response.raw_output_contents.append(
                    raw if shared is None else shared.place(name, raw)
                )
            ok = True
            return response
        finally:
            self.in_flight -= 1
            if version is not None:
                self.stats.record_request(
                    request.model_name,
                    version,
                    ok=ok,
                    total_ns=time.perf_counter_ns() - started,
                    now_ms=int(time.time() * 1000),
                )

    def loaded_state(self) -> tuple[int, int, tuple[tuple[str, int], ...]]:
        """Changes whenever the loaded versions do (cheap: no report is built)."""
        cache = self.repository.cache
        return (cache.loads, cache.evictions, tuple(cache.loaded_keys()))

    def load_report(self) -> LoadReport:
        cache = self.repository.cache
        return LoadReport(
            in_flight=self.in_flight,
            queue_depth=self.repository.queue_depth,
            loaded_versions=tuple(f"{name}:{version}" for name, version in cache.loaded_keys()),
            memory_bytes=cache.used_bytes,
            memory_budget_bytes=cache.budget_bytes,
        )


def _requested_outputs(request: pb.ModelInferRequest, declared: Sequence[str]) -> list[str]:
    if not request.outputs:
        return list(declared)
    names: list[str] = []
    for output in request.outputs:
        if output.name not in declared:
            raise InvalidArgument(
                f"unknown output {output.name!r}; the model returns {', '.join(declared)}"
            )
        if classification_count(output) > 0:
            raise InvalidArgument(f"output {output.name!r}: classification is not supported")
        if output.name not in names:
            names.append(output.name)
    return names
