"""RepositoryModelLoad's parameters: Triton's ``config`` override in, everything else refused."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import json_format

from mesh.errors import InvalidArgument
from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc

CONFIG_PARAMETER = "config"
FILE_PREFIX = "file:"


def config_override(
    model: str, parameters: Mapping[str, pb.ModelRepositoryParameter]
) -> mc.ModelConfig | None:
    """The model config a load request carries (Triton's JSON ``config``), None if none.

    Triton's ``file:<path>`` parameters would load model files that never went through
    the repository's atomic publishing; they are refused by name, as is any other key.
    """
    files = sorted(k for k in parameters if k.startswith(FILE_PREFIX))
    if files:
        raise InvalidArgument(
            f"load parameter(s) {', '.join(files)}: model files in a load request are not "
            "supported; publish the version to the model repository and load it by name"
        )
    unknown = sorted(k for k in parameters if k != CONFIG_PARAMETER)
    if unknown:
        raise InvalidArgument(
            f"unknown load parameter(s) {', '.join(unknown)}; supported: {CONFIG_PARAMETER}"
        )
    parameter = parameters.get(CONFIG_PARAMETER)
    if parameter is None:
        return None
    if parameter.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(
            f"load parameter {CONFIG_PARAMETER!r} must be a string (a JSON model config)"
        )
    config = mc.ModelConfig()
    try:
        # As Triton: the JSON form of ModelConfig, field names as in the proto or camelCase.
        json_format.Parse(parameter.string_param, config)
    except json_format.ParseError as exc:
        raise InvalidArgument(
            f"load parameter {CONFIG_PARAMETER!r} is not a valid JSON model config: {exc}"
        ) from None
    if config.name and config.name != model:
        raise InvalidArgument(
            f"load parameter {CONFIG_PARAMETER!r} names model {config.name!r}, "
            f"but the request loads {model!r}"
        )
    config.name = model
    return config
