"""Loading a model version: served as saved, or frozen and optimized for inference on request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mesh.errors import InvalidArgument
from protos.inference import model_config_pb2 as mc
from workers.inference import testing
from workers.inference.model import (
    OPTIMIZE_PARAMETER,
    LoadedModel,
    load_model,
    optimizes_for_inference,
)
from workers.model_repo import ModelRepo

CPU = torch.device("cpu")


def published(path: Path, config: mc.ModelConfig, module: nn.Module) -> LoadedModel:
    version = testing.publish(str(path), config, module)
    return load_model(ModelRepo(str(path)), config, version, CPU)


def quarters(seed: int, *shape: int) -> torch.Tensor:
    """Inputs in multiples of 1/4: with exact weights every sum is exact in FP32."""
    generator = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(*shape, generator=generator) * 4) / 4


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def output(loaded: LoadedModel, name: str, x: torch.Tensor) -> torch.Tensor:
    out = loaded.run({name: x}, x.shape[0])
    [value] = out.values()
    assert isinstance(value, torch.Tensor)
    return value


def optimizing(config: mc.ModelConfig, value: str = "true") -> mc.ModelConfig:
    config.parameters[OPTIMIZE_PARAMETER].string_value = value
    return config


def test_optimized_torchscript_gives_the_same_results_at_every_batch_size(
    tmp_path: Path,
) -> None:
    module = testing.seeded(testing.SmallCNN(), 5, exact=True)
    loaded = published(tmp_path, optimizing(testing.cnn_config()), module)
    assert loaded.optimized
    # Weights are graph constants after freezing; the budget still counts them.
    assert loaded.memory_bytes == parameter_bytes(module)
    images = quarters(0, 6, 1, 8, 8)
    batched = output(loaded, "image", images)
    alone = torch.cat([output(loaded, "image", images[i : i + 1]) for i in range(6)])
    assert torch.equal(batched, alone)  # bit for bit: the batch size changes nothing
    assert torch.equal(batched, module(images))  # exact sums: the rewrite changes nothing


def test_by_default_the_model_serves_as_saved(tmp_path: Path) -> None:
    module = testing.seeded(testing.MLP(), 6)
    loaded = published(tmp_path, testing.mlp_config(), module)
    assert not loaded.optimized
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    # Any weights, not just exact ones: the saved graph runs the module's own kernels.
    assert torch.equal(output(loaded, "x", x), module(x))
    assert loaded.memory_bytes == parameter_bytes(module)
    explicit = published(tmp_path / "off", optimizing(testing.mlp_config(), "false"), module)
    assert not explicit.optimized


def test_a_bad_parameter_value_is_named(tmp_path: Path) -> None:
    config = optimizing(testing.mlp_config(), "sometimes")
    with pytest.raises(InvalidArgument, match=r"OPTIMIZE_FOR_INFERENCE must be .*'sometimes'"):
        published(tmp_path, config, testing.MLP())


def test_a_model_that_cannot_be_frozen_serves_as_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = testing.model_config(
        "unfreezable", [("x", testing.FP32, [2])], [("y", testing.FP32, [2])]
    )
    loaded = published(tmp_path, optimizing(config), testing.Unfreezable())
    assert not loaded.optimized
    assert "serving without optimize_for_inference" in caplog.text
    x = quarters(2, 4, 2)
    assert torch.equal(output(loaded, "x", x), x * 2)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, False), ("true", True), (" True ", True), ("false", False)]
)
def test_the_parameter_is_read_leniently(value: str | None, expected: bool) -> None:
    config = testing.mlp_config() if value is None else optimizing(testing.mlp_config(), value)
    assert optimizes_for_inference(config) is expected
