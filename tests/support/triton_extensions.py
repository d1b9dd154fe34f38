"""Drives Triton's model-control and system shared-memory calls with tritonclient, prints JSON.

Runs in its own process (tritonclient's ``inference.*`` protobuf symbols clash with
meshserve's). Nothing from meshserve is imported here. Usage::

    python -m tests.support.triton_extensions HOST:PORT SCENARIO [ARGS_JSON] < args.json

The arguments come from ARGS_JSON if given, else from stdin.

The call sequences follow Triton's own examples (``simple_grpc_model_control.py``,
``simple_grpc_shm_client.py``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def failure(call: Callable[[], Any]) -> dict[str, str] | None:
    """The status and message a call failed with; None if it succeeded."""
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return None


def fp32(name: str, array: Any) -> Any:
    tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def control(client: Any, args: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {"warm_up_failure": failure(lambda: client.load_model("warmfail"))}
    index = client.get_model_repository_index(as_json=True)["models"]
    results["index"] = {m["name"]: [m.get("state"), m.get("reason", "")] for m in index}

    results["override"] = failure(lambda: client.load_model("mlp", config=args["config"]))
    results["override_config"] = client.get_model_config("mlp", as_json=True)["config"]
    x = np.asarray(args["x"], dtype=np.float32)
    results["override_y"] = client.infer("mlp", [fp32("x", x)]).as_numpy("y").tolist()
    results["files"] = failure(
        lambda: client.load_model(
            "mlp", config=args["config"], files={"file:1/model.pt": b"not a model"}
        )
    )
    results["bad_config"] = failure(lambda: client.load_model("mlp", config="{not json"))
    results["reload"] = failure(lambda: client.load_model("mlp"))
    results["reloaded_config"] = client.get_model_config("mlp", as_json=True)["config"]
    return results


def names_cause(reason: str, cause: str) -> bool:
    """Whether every replica in ``reason`` gives ``cause``: a worker's own reason starts with
    it; a gateway's merged one is ``WORKER: STATE: REASON`` per worker, joined by "; " (a
    worker whose poll has not seen the model yet reads "not in its repository")."""
    parts = [part for part in reason.split("; ") if part]
    return reason.startswith(cause) or (bool(parts) and all(f": {cause}" in p for p in parts))


def cause(client: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Waits until the index lists ``model`` with every replica's reason naming
    ``args["reason"]``, then asks to load it. (Before its load fails, a version reads
    "not loaded yet".)
    """
    deadline = time.monotonic() + args["deadline_s"]
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        index = client.get_model_repository_index(as_json=True).get("models", [])
        rows = [m for m in index if m["name"] == args["model"]]
        if rows and all(names_cause(m.get("reason", ""), args["reason"]) for m in rows):
            break
        time.sleep(0.2)
    return {"index": rows, "load": failure(lambda: client.load_model(args["model"]))}


def swap(client: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Infers without a pause until the outputs change; reports every failure meanwhile.

    It starts once ``args["settle"]`` requests in a row have succeeded (the model may
    still be loading when it is called).
    """
    x = np.asarray(args["x"], dtype=np.float32)
    model = args["model"]
    deadline = time.monotonic() + args["deadline_s"]
    streak = 0
    while streak < args.get("settle", 1):
        try:
            first = client.infer(model, [fp32("x", x)]).as_numpy("y").tolist()
            streak += 1
        except InferenceServerException:
            if time.monotonic() > deadline:
                raise
            streak = 0
            time.sleep(0.2)
    print("serving", flush=True)  # the test replaces model.pt once it reads this
    errors: list[str] = []
    requests = 0
    latest = first
    while latest == first and time.monotonic() < deadline:
        requests += 1
        try:
            latest = client.infer(model, [fp32("x", x)]).as_numpy("y").tolist()
        except InferenceServerException as exc:
            errors.append(f"{exc.status()}: {exc.message()}")
    return {"before": first, "after": latest, "errors": errors, "requests": requests}


def shared_memory(client: Any, args: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    key = args["key_prefix"]
    client.unregister_system_shared_memory()
    ids = np.asarray(args["ids"], dtype=np.int64)
    x = np.asarray(args["x"], dtype=np.float32)
    total_size = ids.shape[0] * 8
    # One object holds both inputs, as in Triton's example; another holds the outputs.
    inputs = shm.create_shared_memory_region("inputs", f"/{key}_in", ids.nbytes + x.nbytes)
    outputs = shm.create_shared_memory_region("outputs", f"/{key}_out", 4096)
    try:
        shm.set_shared_memory_region(inputs, [ids])
        shm.set_shared_memory_region(inputs, [x], offset=ids.nbytes)
        client.register_system_shared_memory("inputs", f"/{key}_in", ids.nbytes + x.nbytes)
        client.register_system_shared_memory("outputs", f"/{key}_out", 4096)
        results["status"] = client.get_system_shared_memory_status(as_json=True)
        results["duplicate"] = failure(
            lambda: client.register_system_shared_memory("inputs", f"/{key}_in", 8)
        )
        results["missing_key"] = failure(
            lambda: client.register_system_shared_memory("ghost", f"/{key}_missing", 8)
        )
        results["too_big"] = failure(
            lambda: client.register_system_shared_memory("big", f"/{key}_out", 8192)
        )

        # intops: ids from shared memory; "total" into shared memory, "doubled" sent back raw.
        ids_in = grpcclient.InferInput("ids", list(ids.shape), "INT64")
        ids_in.set_shared_memory("inputs", ids.nbytes)
        total_out = grpcclient.InferRequestedOutput("total")
        total_out.set_shared_memory("outputs", total_size)
        doubled_out = grpcclient.InferRequestedOutput("doubled")
        result = client.infer("intops", [ids_in], outputs=[total_out, doubled_out])
        response = result.get_response()
        results["raw_sizes"] = [len(raw) for raw in response.raw_output_contents]
        total_meta = result.get_output("total")
        results["total"] = shm.get_contents_as_numpy(
            outputs, triton_to_np_dtype(total_meta.datatype), list(total_meta.shape)
        ).tolist()
        results["doubled"] = result.as_numpy("doubled").tolist()

        # mlp: x at an offset of the inputs region, y at an offset of the outputs region.
        x_in = grpcclient.InferInput("x", list(x.shape), "FP32")
        x_in.set_shared_memory("inputs", x.nbytes, offset=ids.nbytes)
        y_out = grpcclient.InferRequestedOutput("y")
        y_out.set_shared_memory("outputs", x.shape[0] * 3 * 4, offset=1024)
        result = client.infer("mlp", [x_in], outputs=[y_out])
        y_meta = result.get_output("y")
        results["y"] = shm.get_contents_as_numpy(
            outputs, triton_to_np_dtype(y_meta.datatype), list(y_meta.shape), offset=1024
        ).tolist()

        unknown = grpcclient.InferInput("x", list(x.shape), "FP32")
        unknown.set_shared_memory("nowhere", x.nbytes)
        results["unknown_region"] = failure(lambda: client.infer("mlp", [unknown]))
        beyond = grpcclient.InferInput("x", list(x.shape), "FP32")
        beyond.set_shared_memory("inputs", x.nbytes, offset=ids.nbytes + 4)
        results["out_of_bounds"] = failure(lambda: client.infer("mlp", [beyond]))
        small = grpcclient.InferRequestedOutput("y")
        small.set_shared_memory("outputs", 4)
        results["output_too_small"] = failure(
            lambda: client.infer("mlp", [fp32("x", x)], outputs=[small])
        )
        results["cuda"] = failure(lambda: client.get_cuda_shared_memory_status())

        client.unregister_system_shared_memory("inputs")
        results["after_unregister"] = client.get_system_shared_memory_status(as_json=True)
        results["gone"] = failure(lambda: client.get_system_shared_memory_status("inputs"))
        results["unregister_again"] = failure(
            lambda: client.unregister_system_shared_memory("inputs")
        )
        client.unregister_system_shared_memory()
        results["after_unregister_all"] = client.get_system_shared_memory_status(as_json=True)
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)
    return results


SCENARIOS = {"control": control, "cause": cause, "swap": swap, "shm": shared_memory}


if __name__ == "__main__":
    client = grpcclient.InferenceServerClient(sys.argv[1])
    try:
        args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else json.load(sys.stdin)
        print(json.dumps(SCENARIOS[sys.argv[2]](client, args)), flush=True)
    finally:
        client.close()
