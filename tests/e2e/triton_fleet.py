"""Triton's model-control and statistics calls against ``meshserve up``'s gateway, as a
Triton user makes them; prints what each step saw as JSON.

Runs in its own process (tritonclient's ``inference.*`` protobufs clash with meshserve's)::

    python -m tests.e2e.triton_fleet GATEWAY STEP [COUNT]

Steps: ``unload``, ``load`` (then the model's readiness, the repository index and a few
inferences), ``infer COUNT`` (COUNT inferences of ``simple``, many in flight, and the
statistics before and after), ``shm KEY`` (Triton's system shared-memory example: inputs
and outputs of ``simple`` in regions, COUNT times, then the regions unregistered).
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

MODEL = "simple"


def inputs() -> list[Any]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    tensors = [grpcclient.InferInput("INPUT0", [1, 16], "INT32")]
    tensors.append(grpcclient.InferInput("INPUT1", [1, 16], "INT32"))
    tensors[0].set_data_from_numpy(a)
    tensors[1].set_data_from_numpy(b)
    return tensors


def view(client: Any) -> dict[str, Any]:
    """Readiness, the index and three inferences (each ok, or its error)."""
    seen: dict[str, Any] = {
        "ready": client.is_model_ready(MODEL),
        "index": client.get_model_repository_index(as_json=True).get("models", []),
        "infer": [],
    }
    for _ in range(3):
        try:
            result = client.infer(MODEL, inputs())
            seen["infer"].append(result.as_numpy("OUTPUT0").tolist()[0][:3])
        except InferenceServerException as exc:
            seen["infer"].append(f"{exc.status()}: {exc.message()}")
    return seen


def count(client: Any) -> int:
    stats = client.get_inference_statistics(MODEL, as_json=True).get("model_stats", [])
    return sum(int(s.get("inference_count", 0)) for s in stats)


def infer_many(client: Any, n: int) -> dict[str, Any]:
    """``n`` inferences, up to 16 in flight (a hot key spreads over two workers)."""
    before = count(client)
    done: queue.Queue[str] = queue.Queue()

    def callback(result: Any, error: Any) -> None:
        done.put("ok" if error is None else str(error))

    outcomes: list[str] = []
    sent = 0
    while sent < n or len(outcomes) < n:
        while sent < n and sent - len(outcomes) < 16:
            client.async_infer(MODEL, inputs(), callback)
            sent += 1
        outcomes.append(done.get(timeout=60))
    return {
        "failures": [o for o in outcomes if o != "ok"],
        "before": before,
        "after": [count(client) for _ in range(3)],
    }


def shared_memory(client: Any, key: str, n: int) -> dict[str, Any]:
    """As Triton's simple_grpc_shm_client.py: both inputs in one region, both outputs in
    another; ``n`` inferences (the ring picks a worker for each: every worker on this host
    must know the regions)."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 2, dtype=np.int32)
    size = a.nbytes
    client.unregister_system_shared_memory()
    inputs = shm.create_shared_memory_region("input_data", f"/{key}_in", 2 * size)
    outputs = shm.create_shared_memory_region("output_data", f"/{key}_out", 2 * size)
    seen: dict[str, Any] = {"results": []}
    try:
        shm.set_shared_memory_region(inputs, [a, b])
        client.register_system_shared_memory("input_data", f"/{key}_in", 2 * size)
        client.register_system_shared_memory("output_data", f"/{key}_out", 2 * size)
        # regions is a map, name → status.
        seen["status"] = sorted(client.get_system_shared_memory_status(as_json=True)["regions"])
        for _ in range(n):
            tensors = [grpcclient.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
            tensors[0].set_shared_memory("input_data", size)
            tensors[1].set_shared_memory("input_data", size, offset=size)
            wanted = [grpcclient.InferRequestedOutput(f"OUTPUT{i}") for i in (0, 1)]
            wanted[0].set_shared_memory("output_data", size)
            wanted[1].set_shared_memory("output_data", size, offset=size)
            client.infer(MODEL, tensors, outputs=wanted)
            total = shm.get_contents_as_numpy(outputs, np.int32, [1, 16])
            difference = shm.get_contents_as_numpy(outputs, np.int32, [1, 16], offset=size)
            seen["results"].append([total.tolist()[0][:3], difference.tolist()[0][:3]])
        client.unregister_system_shared_memory()
        seen["after"] = client.get_system_shared_memory_status(as_json=True).get("regions", {})
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)
    return seen


def main(url: str, step: str, n: int) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url)
    if step == "unload":
        client.unload_model(MODEL)
        return view(client)
    if step == "load":
        client.load_model(MODEL)
        return view(client)
    if step == "infer":
        return infer_many(client, n)
    if step.startswith("shm:"):
        return shared_memory(client, step.split(":", 1)[1], n)
    raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)))
