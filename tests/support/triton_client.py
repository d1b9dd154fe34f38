"""Drives an inference worker with tritonclient.grpc and prints what it got back as JSON.

Runs in its own process: tritonclient registers ``inference.*`` protobuf symbols
that clash with meshserve's in one process. Usage::

    python -m tests.support.triton_client HOST:PORT < inputs.json > results.json

``inputs.json`` holds ``{"x": [[...]], "ids": [[...]], "text": ["...", ...]}``.
Nothing from meshserve is imported here.
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def fp32_input(name: str, values: Any) -> Any:
    array = np.asarray(values, dtype=np.float32)
    tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def main(url: str, inputs: dict[str, Any]) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url)
    results: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("mlp"),
        "ghost_ready": client.is_model_ready("ghost"),
        "metadata": client.get_model_metadata("mlp", as_json=True),
        "config": client.get_model_config("mlp", as_json=True),
    }

    x = fp32_input("x", inputs["x"])
    response = client.infer("mlp", [x], outputs=[grpcclient.InferRequestedOutput("y")])
    results["fp32"] = response.as_numpy("y").tolist()
    results["fp32_version"] = response.get_response().model_version
    # Compressed requests, custom headers (the version header), and an error's status.
    results["compressed"] = {
        algorithm: client.infer("mlp", [x], compression_algorithm=algorithm).as_numpy("y").tolist()
        for algorithm in ("gzip", "deflate")
    }
    pinned = client.infer("mlp", [x], headers={"x-model-version": "1"})
    results["header_version"] = pinned.get_response().model_version
    try:
        client.infer("ghost", [x], client_timeout=30)
        results["ghost_error"] = None
    except InferenceServerException as exc:
        results["ghost_error"] = [exc.status(), exc.message()]
    stats = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    results["inference_count"] = int(stats.get("inference_count", 0))

    ids = np.asarray(inputs["ids"], dtype=np.int64)
    ids_in = grpcclient.InferInput("ids", list(ids.shape), "INT64")
    ids_in.set_data_from_numpy(ids)
    response = client.infer("intops", [ids_in])
    results["int64_total"] = response.as_numpy("total").tolist()
    results["int64_doubled"] = response.as_numpy("doubled").tolist()

    text = np.asarray([[t.encode()] for t in inputs["text"]], dtype=np.object_)
    text_in = grpcclient.InferInput("text", list(text.shape), "BYTES")
    text_in.set_data_from_numpy(text)
    response = client.infer("textops", [text_in])
    results["bytes_length"] = response.as_numpy("length").tolist()
    results["bytes_upper"] = [[v.decode() for v in row] for row in response.as_numpy("upper")]

    # Triton's request-level parameters, as tritonclient types them: accepted, and (none of
    # these models being a sequence model or having priority levels) without effect.
    response = client.infer(
        "mlp",
        [fp32_input("x", inputs["x"])],
        priority=1,
        timeout=10_000_000,
        parameters={"tag": "bench", "retry": 2, "trace": True},
    )
    results["with_parameters"] = response.as_numpy("y").tolist()

    # tritonclient calls back with keywords: callback(result=..., error=...).
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(
        "mlp", [fp32_input("x", inputs["x"])], lambda result, error: done.put((result, error))
    )
    result, error = done.get(timeout=60)
    results["async"] = None if error else result.as_numpy("y").tolist()
    results["async_error"] = str(error) if error else None

    streamed: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: streamed.put((result, error)))
    rows = inputs["x"]
    for index, row in enumerate(rows):
        client.async_stream_infer("mlp", [fp32_input("x", [row])], request_id=str(index))
    stream: dict[str, Any] = {}
    for _ in rows:
        result, error = streamed.get(timeout=60)
        if error:
            stream[f"error-{len(stream)}"] = str(error)
        else:
            stream[result.get_response().id] = result.as_numpy("y").tolist()
    client.stop_stream()
    results["stream"] = stream
    client.close()
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.load(sys.stdin))))
