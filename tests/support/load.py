"""Steady ModelInfer load through a gateway from a few client threads, every outcome recorded.

For the chaos test and ``bench.chaos``: each caller has its own channel (as separate clients
would), sends the demo model's request with a deadline, and records when each call started,
ended and how it ended, so a test can ask which calls failed around a fault.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from cli.admin_credential import admin_metadata
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.meshserve.mesh.v1 import admin_pb2, admin_pb2_grpc


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    #: None: the call succeeded.
    code: grpc.StatusCode | None
    details: str = ""


def demo_request(model: str = "demo") -> pb.ModelInferRequest:
    """One row of the demo model's four features (``meshserve up`` trains it)."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.array([[0.5, -1.0, 2.0, 0.1]], np.float32).tobytes())
    return request


class InferLoad:
    """``callers`` threads calling ModelInfer until ``stop()``; a context manager."""

    def __init__(
        self,
        gateway: str,
        *,
        model: str = "demo",
        callers: int = 4,
        timeout_s: float = 10.0,
        pause_s: float = 0.01,
    ) -> None:
        self.gateway = gateway
        self.request = demo_request(model)
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._call, name=f"caller-{i}", daemon=True)
            for i in range(callers)
        ]

    def __enter__(self) -> InferLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)

    def _call(self) -> None:
        with grpc.insecure_channel(self.gateway) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while not self._stopping.is_set():
                started = time.monotonic()
                try:
                    infer(self.request, timeout=self.timeout_s)
                    outcome = Outcome(started, time.monotonic(), None)
                except grpc.RpcError as exc:
                    outcome = Outcome(started, time.monotonic(), exc.code(), exc.details() or "")
                with self._lock:
                    self.outcomes.append(outcome)
                # A failed call is not retried at once: a tight loop of refusals would only
                # burn the CPU the mesh needs to recover.
                self._stopping.wait(self.pause_s if outcome.code is None else 0.1)

    def between(self, start: float, end: float) -> list[Outcome]:
        """The calls that started in [start, end) (monotonic seconds)."""
        with self._lock:
            return [o for o in self.outcomes if start <= o.started < end]

    def succeeded_after(self, moment: float) -> bool:
        """Whether some call that started after ``moment`` succeeded."""
        with self._lock:
            return any(o.code is None and o.started >= moment for o in self.outcomes)


def routed_inference_ports(gateway: str, state_dir: Path) -> set[str]:
    """The ports of the inference endpoints the gateway routes to now (healthy, not
    ejected), asked through Admin with the admin key of the ``up`` at ``state_dir``."""
    with grpc.insecure_channel(gateway) as channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).ListEndpoints(
                admin_pb2.ListEndpointsRequest(host="inference"),
                timeout=5,
                metadata=admin_metadata(None, state_dir),
            )
        except grpc.RpcError:
            return set()
    return {
        e.address.rsplit(":", 1)[1]
        for g in reply.groups
        if not g.subset
        for e in g.endpoints
        if e.healthy and not e.ejected
    }
