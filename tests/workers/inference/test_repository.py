"""The served view of the repository: loading waits, failed loads, last known good, torch.export."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from mesh.errors import NotFound, Unavailable
from protos.inference import model_config_pb2 as mc
from workers.inference import testing
from workers.inference.model import LoadedModel, load_model
from workers.inference.repository import ModelRepository
from workers.inference.stats import Statistics
from workers.model_repo import EXPORT_PLATFORM, ModelRepo


def repository(path: Path, **kwargs: object) -> ModelRepository:
    return ModelRepository(ModelRepo(str(path)), Statistics(), **kwargs)  # type: ignore[arg-type]


async def until(condition: object, seconds: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_loading_version_is_waited_for_up_to_the_deadline(tmp_path: Path) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    gate = threading.Event()

    def slow_loader(
        repo: ModelRepo, config: mc.ModelConfig, version: int, device: torch.device
    ) -> LoadedModel:
        gate.wait(timeout=60)
        return load_model(repo, config, version, device)

    served = repository(tmp_path, loader=slow_loader)
    poll = asyncio.create_task(served.poll_once())
    await until(lambda: served.cache.is_loading(("mlp", 1)))
    for requested in ("1", ""):
        with pytest.raises(Unavailable, match=r"model 'mlp' version 1 is still loading"):
            await served.acquire("mlp", requested, timeout=0.05)
    assert not served.is_ready("mlp", "")
    waiter = asyncio.create_task(served.acquire("mlp", "1", timeout=60))
    gate.set()
    assert (await waiter).model.version == 1
    await poll
    assert served.is_ready("mlp", "1")
    with pytest.raises(NotFound, match=r"unknown model 'ghost'"):
        await served.acquire("ghost", "")


async def test_a_broken_new_version_leaves_the_old_one_serving(tmp_path: Path) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    served = repository(tmp_path)
    await served.poll_once()
    ModelRepo(str(tmp_path)).publish_version("mlp", {"model.pt": b"not a torchscript archive"})
    await served.poll_once()
    assert (await served.acquire("mlp", "")).model.version == 1
    rows = {
        (name, version): (state, reason) for name, version, state, reason in served.index(False)
    }
    assert rows[("mlp", "1")] == ("READY", "")
    state, reason = rows[("mlp", "2")]
    assert state == "UNAVAILABLE"
    assert reason.startswith("load failed: RuntimeError: PytorchStreamReader failed")
    with pytest.raises(Unavailable, match=r"model 'mlp' version 2 failed to load"):
        await served.acquire("mlp", "2")


async def test_a_broken_config_keeps_the_last_good_one(tmp_path: Path) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    served = repository(tmp_path)
    await served.poll_once()
    (tmp_path / "mlp" / "config.pbtxt").write_text("max_batch_size: banana")
    await served.poll_once()
    assert served.state("mlp").error.startswith("model 'mlp': config.pbtxt does not parse")
    assert (await served.acquire("mlp", "")).model.version == 1


async def test_a_model_that_leaves_the_repository_is_unloaded(tmp_path: Path) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    served = repository(tmp_path)
    await served.poll_once()
    (tmp_path / "mlp" / "config.pbtxt").unlink()
    await served.poll_once()
    assert served.names() == [] and served.cache.loaded_keys() == []
    with pytest.raises(NotFound):
        await served.acquire("mlp", "")


async def test_a_missing_repository_keeps_its_models_serving_until_it_is_back(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    testing.publish(str(root), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    served = repository(root)
    await served.poll_once()
    root.rename(tmp_path / "moved")
    await served.poll_once()
    assert served.names() == ["mlp"]
    assert (await served.acquire("mlp", "")).model.version == 1
    (tmp_path / "moved").rename(root)
    (root / "mlp" / "config.pbtxt").unlink()
    await served.poll_once()  # back, without the model: that is a removal
    assert served.names() == []


async def test_torch_export_archives_are_served(tmp_path: Path) -> None:
    module = testing.seeded(testing.MLP(), 4)
    config = testing.mlp_config("exported", platform=EXPORT_PLATFORM)
    repo = ModelRepo(str(tmp_path))
    repo.write_config("exported", config)
    repo.publish_version("exported", {"model.pt2": testing.export_bytes(module, torch.zeros(2, 4))})
    served = repository(tmp_path)
    await served.poll_once()
    exported = await served.acquire("exported", "")
    x = torch.randn(5, 4)
    y = (await exported.batcher.infer({"x": x}))["y"]
    assert isinstance(y, torch.Tensor) and torch.allclose(y, module(x), atol=1e-6)


class CountingLoader:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(
        self, repo: ModelRepo, config: mc.ModelConfig, version: int, device: torch.device
    ) -> LoadedModel:
        self.calls.append((config.name, version))
        return load_model(repo, config, version, device)


async def test_a_changed_config_loads_aside_then_swaps(tmp_path: Path) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    loader = CountingLoader()
    served = repository(tmp_path, loader=loader)
    await served.poll_once()
    before = await served.acquire("mlp", "")
    ModelRepo(str(tmp_path)).write_config("mlp", testing.mlp_config(max_batch_size=8))
    await served.poll_once()
    after = await served.acquire("mlp", "")
    assert after is not before and after.model.signature.max_batch_size == 8
    assert served.state("mlp").config == testing.mlp_config(max_batch_size=8)
    assert loader.calls == [("mlp", 1), ("mlp", 1)]
    await served.poll_once()  # unchanged: nothing reloads
    assert len(loader.calls) == 2


async def test_a_config_its_model_cannot_run_is_rejected_and_the_old_one_serves(
    tmp_path: Path,
) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    loader = CountingLoader()
    served = repository(tmp_path, loader=loader)
    await served.poll_once()
    wrong = testing.model_config("mlp", [("x", testing.FP32, [5])], [("y", testing.FP32, [3])])
    ModelRepo(str(tmp_path)).write_config("mlp", wrong)  # the warm-up pass fails on [1, 5]
    await served.poll_once()
    still = await served.acquire("mlp", "")
    assert still.model.signature.inputs[0].dims == (4,)
    assert served.state("mlp").error.startswith("config change rejected: version 1")
    [(_, _, state, reason)] = served.index(False)
    assert (state, reason.startswith("config change rejected")) == ("READY", True)
    await served.poll_once()  # the rejected config is not retried on every poll
    assert len(loader.calls) == 2
