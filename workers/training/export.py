"""Turns a trained network into what the model repository serves: TorchScript and its config."""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from protos.inference import model_config_pb2 as mc
from workers.model_repo import DEFAULT_FILENAMES, TORCHSCRIPT_PLATFORM
from workers.training.catalogue import Signature

MODEL_FILE = DEFAULT_FILENAMES[TORCHSCRIPT_PLATFORM]
#: Largest batch the inference worker's dynamic batcher may form for these small networks.
MAX_BATCH_SIZE = 256


def to_torchscript(module: nn.Module) -> bytes:
    """Scripts ``module`` (in eval mode) and returns the serialized TorchScript archive."""
    was_training = module.training
    module.eval()
    try:
        # torch 2.9+ deprecates TorchScript in favour of torch.export, but libtorch's
        # "pytorch_libtorch" platform — what Triton and our inference worker load — is
        # TorchScript, so we keep producing it and silence only that notice.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.", category=DeprecationWarning
            )
            scripted = torch.jit.script(module)
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
    finally:
        module.train(was_training)
    return buffer.getvalue()


def load_torchscript(data: bytes, device: str = "cpu") -> torch.jit.ScriptModule:
    """Loads a TorchScript archive produced by ``to_torchscript``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.", category=DeprecationWarning)
        module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            io.BytesIO(data), map_location=device
        )
    module.eval()
    return module


def model_config(name: str, sig: Signature) -> mc.ModelConfig:
    """Triton's config for the network: batch dimension implicit, FP32 in and out."""
    return mc.ModelConfig(
        name=name,
        platform=TORCHSCRIPT_PLATFORM,
        max_batch_size=MAX_BATCH_SIZE,
        input=[mc.ModelInput(name=sig.input_name, data_type=mc.TYPE_FP32, dims=sig.input_shape)],
        output=[
            mc.ModelOutput(name=sig.output_name, data_type=mc.TYPE_FP32, dims=sig.output_shape)
        ],
        dynamic_batching=mc.ModelDynamicBatching(),
        # Two versions stay servable, so a canary or a rollback to the previous
        # version needs no config change (Triton's default keeps only the latest).
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=2)),
        default_model_filename=MODEL_FILE,
    )
