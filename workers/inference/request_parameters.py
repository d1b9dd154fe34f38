"""A ModelInfer request's ``parameters`` and its outputs' ``classification``, typed as Triton
types them.

Triton's gRPC endpoint checks the type of every request-level parameter before the request
reaches a model: ``sequence_id`` is an int64 or a string, ``sequence_start`` and
``sequence_end`` are bools, ``priority`` an int64 >= 0 or a uint64, ``timeout`` an int64, keys
starting with ``triton_`` are reserved (only ``triton_enable_empty_final_response``, a bool),
and any other key, passed through to the backend, is an int64, a bool or a string. A client
that sends ``priority`` as a string gets INVALID_ARGUMENT from Triton; it got silent
acceptance here, and never learned its parameter meant nothing.

What the values then do is Triton's too for the models this worker serves: none is a
sequence model and none has priority levels or a queue policy that allows a timeout
override, so Triton ignores those values once they are well typed, and so does this worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.errors import InvalidArgument
from protos.inference import grpc_service_pb2 as pb

#: ``triton_`` keys Triton accepts on a request (the rest of the prefix is reserved).
RESERVED = ("triton_enable_empty_final_response",)
#: Known keys and the value kinds each takes (protobuf's oneof case names).
_KINDS: dict[str, tuple[str, ...]] = {
    "sequence_id": ("int64_param", "string_param"),
    "sequence_start": ("bool_param",),
    "sequence_end": ("bool_param",),
    "priority": ("int64_param", "uint64_param"),
    "timeout": ("int64_param",),
    "triton_enable_empty_final_response": ("bool_param",),
}
#: What any other key may be: what Triton can hand a backend.
_CUSTOM = ("int64_param", "bool_param", "string_param")


def _expected(kinds: tuple[str, ...]) -> str:
    if len(kinds) == 1:
        return kinds[0]
    return ", ".join(kinds[:-1]) + (", or " if len(kinds) > 2 else " or ") + kinds[-1]


def check_request_parameters(parameters: Mapping[str, pb.InferParameter]) -> None:
    """Raises InvalidArgument, with Triton's wording, for a parameter of the wrong type."""
    for key, value in parameters.items():
        if key.startswith("triton_") and key not in RESERVED:
            raise InvalidArgument(
                "parameter keys starting with 'triton_' are reserved for Triton usage. Only "
                f"the following keys starting with 'triton_' are allowed: {' '.join(RESERVED)}"
            )
        kinds = _KINDS.get(key, _CUSTOM)
        if value.WhichOneof("parameter_choice") not in kinds:
            raise InvalidArgument(
                f"invalid value type for '{key}' parameter, expected {_expected(kinds)}."
            )
        if key == "priority" and value.HasField("int64_param") and value.int64_param < 0:
            raise InvalidArgument("invalid value for 'priority', expected value >= 0.")


def classification_count(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    """The output's ``classification`` (0: none), which Triton takes as an int64 only."""
    value = output.parameters.get("classification")
    if value is None:
        return 0
    if value.WhichOneof("parameter_choice") != "int64_param":
        raise InvalidArgument(
            f"output {output.name!r}: invalid value type for 'classification' parameter, "
            "expected int64_param."
        )
    return value.int64_param
