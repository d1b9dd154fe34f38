"""The README's tritonclient step against a running ``meshserve up``; prints what it got as JSON.

Runs in its own process (tritonclient's ``inference.*`` protobufs clash with meshserve's)::

    python -m tests.e2e.triton_tour GATEWAY MODEL
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main(url: str, model: str) -> dict[str, object]:
    client = grpcclient.InferenceServerClient(url)
    metadata = client.get_model_metadata(model, as_json=True)
    spec = metadata["inputs"][0]
    width = int(spec["shape"][-1])
    x = np.linspace(-1.0, 1.0, 2 * width, dtype=np.float32).reshape(2, width)
    tensor = grpcclient.InferInput(spec["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    output = metadata["outputs"][0]["name"]
    return {
        "live": client.is_server_live(),
        "model_ready": client.is_model_ready(model),
        "versions": metadata.get("versions", []),
        "output": result.as_numpy(output).tolist(),
        "version": result.get_response().model_version,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
