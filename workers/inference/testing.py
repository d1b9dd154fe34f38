"""Tiny TorchScript models and a repository writer, for tests and benchmarks.

Every model here is scriptable (TorchScript needs the source file, which is why they
live in a module rather than inside a test), small, and deterministic for a seed.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from protos.inference import model_config_pb2 as mc
from workers.model_repo import TORCHSCRIPT_PLATFORM, ModelRepo


class MLP(nn.Module):
    """FP32 [B, 4] -> FP32 [B, 3]."""

    def __init__(self, hidden: int = 8, features: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class SmallCNN(nn.Module):
    """FP32 [B, 1, 8, 8] -> FP32 [B, 3]."""

    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(channels * 4, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.pool(torch.relu(self.conv(image)))
        out: torch.Tensor = self.head(features.flatten(1))
        return out


class IntOps(nn.Module):
    """INT64 ids [B, 4] -> (INT64 total [B, 1], INT64 doubled [B, 4])."""

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ids.sum(dim=1, keepdim=True), ids * 2


class TextOps(nn.Module):
    """BYTES text [B, 1] -> (INT64 length [B, 1], BYTES upper [B, 1])."""

    def forward(self, text: list[str]) -> tuple[torch.Tensor, list[str]]:
        lengths = torch.tensor([len(t) for t in text], dtype=torch.int64).reshape(-1, 1)
        return lengths, [t.upper() for t in text]


class HalfMask(nn.Module):
    """FP16 a [B, 2], BOOL mask [B, 2] -> FP16 masked [B, 2] (a where mask else 0)."""

    def forward(self, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, a, torch.zeros_like(a))


class Fragile(nn.Module):
    """FP32 x [B, 2] -> FP32 y [B, 2]; raises on any negative input (a model bug on demand)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input reached /secret/path")
        return x * 2


class FailsWarmUp(nn.Module):
    """FP32 x [B, 2] -> FP32 y [B, 2] (x + 1); raises on an all-zero input, i.e. the warm-up's.

    Stands for a model that cannot load (its warm-up pass raises) but whose message
    says why, as the issue's ``RuntimeError: stoll`` did.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool((x != 0).any()):
            raise RuntimeError("stoll")
        return x + 1


class _TensorOp(nn.Module):
    """A TorchScript interface: any module mapping a tensor to a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[empty-body]
        pass  # TorchScript requires an interface method's body to be exactly `pass`


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # as for torch.jit.script
    TensorOp: Any = torch.jit.interface(_TensorOp)


class Doubler(nn.Module):
    """x -> x * 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Unfreezable(nn.Module):
    """FP32 x [B, 2] -> FP32 y [B, 2] (x * 2); TorchScript cannot freeze it.

    Its forward assigns a submodule of an interface type, which freezing rejects.
    """

    # Spelled out: this module's postponed (string) annotations do not resolve for
    # TorchScript's interface check.
    __annotations__ = {"op": TensorOp}

    def __init__(self) -> None:
        super().__init__()
        self.op = Doubler()
        self.spare = Doubler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.op = self.spare
        return self.op.forward(x)


def seeded(module: nn.Module, seed: int, *, exact: bool = False) -> nn.Module:
    """Sets ``module``'s weights from ``seed``.

    ``exact`` rounds every weight to a multiple of 1/4, so that sums over inputs of
    quarter values are exact in FP32: batched and unbatched runs must then agree bit
    for bit whatever order the kernels add in.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            values = torch.randn(p.shape, generator=generator)
            p.copy_(torch.round(values * 4) / 4 if exact else values * 0.5)
    return module.eval()


def torchscript_bytes(module: nn.Module) -> bytes:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream; it is still Triton's PyTorch format.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def export_bytes(module: nn.Module, example: torch.Tensor, max_batch_size: int = 16) -> bytes:
    """A ``torch.export`` archive (``model.pt2``) whose first dim is a dynamic batch."""
    batch = torch.export.Dim("batch", min=1, max=max_batch_size)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def model_config(
    name: str,
    inputs: Sequence[tuple[str, int, Sequence[int]]],
    outputs: Sequence[tuple[str, int, Sequence[int]]],
    *,
    max_batch_size: int = 16,
    queue_delay_us: int | None = 2000,
    preferred: Sequence[int] = (),
    latest: int | None = None,
    platform: str = TORCHSCRIPT_PLATFORM,
) -> mc.ModelConfig:
    """A config.pbtxt: ``queue_delay_us`` None leaves dynamic batching off."""
    config = mc.ModelConfig(name=name, platform=platform, max_batch_size=max_batch_size)
    for n, dt, dims in inputs:
        config.input.add(name=n, data_type=dt, dims=list(dims))
    for n, dt, dims in outputs:
        config.output.add(name=n, data_type=dt, dims=list(dims))
    if queue_delay_us is not None and max_batch_size > 0:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(preferred)
    if latest is not None:
        config.version_policy.latest.num_versions = latest
    return config


def publish(repo_url: str, config: mc.ModelConfig, module: nn.Module) -> int:
    """Writes ``config`` and publishes ``module`` as the model's next version."""
    repo = ModelRepo(repo_url)
    repo.write_config(config.name, config)
    return repo.publish_version(config.name, {"model.pt": torchscript_bytes(module)})


FP32, INT64, BYTES, FP16, BOOL = (
    mc.TYPE_FP32,
    mc.TYPE_INT64,
    mc.TYPE_STRING,
    mc.TYPE_FP16,
    mc.TYPE_BOOL,
)


def mlp_config(name: str = "mlp", **kwargs: object) -> mc.ModelConfig:
    return model_config(name, [("x", FP32, [4])], [("y", FP32, [3])], **kwargs)  # type: ignore[arg-type]


def cnn_config(name: str = "cnn", **kwargs: object) -> mc.ModelConfig:
    return model_config(name, [("image", FP32, [1, 8, 8])], [("logits", FP32, [3])], **kwargs)  # type: ignore[arg-type]


def populate(repo_url: str) -> dict[str, nn.Module]:
    """The standard test repository: one model per datatype family; returns the modules."""
    modules: dict[str, nn.Module] = {
        "mlp": seeded(MLP(), 1, exact=True),
        "cnn": seeded(SmallCNN(), 2),
        "intops": IntOps(),
        "textops": TextOps(),
        "halfmask": HalfMask(),
        "fragile": Fragile(),
    }
    configs = {
        "mlp": mlp_config(),
        "cnn": cnn_config(),
        "intops": model_config(
            "intops", [("ids", INT64, [4])], [("total", INT64, [1]), ("doubled", INT64, [4])]
        ),
        "textops": model_config(
            "textops", [("text", BYTES, [1])], [("length", INT64, [1]), ("upper", BYTES, [1])]
        ),
        "halfmask": model_config(
            "halfmask", [("a", FP16, [2]), ("mask", BOOL, [2])], [("masked", FP16, [2])]
        ),
        "fragile": model_config("fragile", [("x", FP32, [2])], [("y", FP32, [2])]),
    }
    for name, module in modules.items():
        publish(repo_url, configs[name], module)
    return modules
