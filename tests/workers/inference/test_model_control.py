"""Load errors with their cause, model files replaced in place, and load-time config overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mesh.errors import InvalidArgument, Unavailable
from protos.inference import grpc_service_pb2 as pb
from tests.workers.inference.test_repository import CountingLoader, repository
from workers.inference import testing
from workers.inference.causes import MAX_CAUSE_CHARS, describe, load_failure
from workers.inference.load_parameters import config_override
from workers.inference.model import ModelError


def replace_in_place(path: Path, data: bytes) -> None:
    """Writes ``data`` next to ``path`` and renames it over ``path`` (atomic, as deploys do)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def index_rows(served: object) -> dict[tuple[str, str], tuple[str, str]]:
    return {(n, v): (s, r) for n, v, s, r in served.index(False)}  # type: ignore[attr-defined]


async def run(served: object, x: torch.Tensor, model: str = "mlp") -> torch.Tensor:
    acquired = await served.acquire(model, "")  # type: ignore[attr-defined]
    y = (await acquired.batcher.infer({"x": x}))["y"]
    assert isinstance(y, torch.Tensor)
    return y


# -- causes ------------------------------------------------------------------------------------


def test_a_cause_is_its_type_and_message_bounded_and_on_one_line() -> None:
    assert describe(RuntimeError("stoll")) == "RuntimeError: stoll"
    assert describe(ValueError()) == "ValueError"
    wrapped = ModelError("model 'm' version 1 failed in forward: TorchScript error")
    wrapped.__cause__ = KeyError("weight")
    assert load_failure(wrapped) == "load failed: KeyError: 'weight'"
    long = describe(RuntimeError("x\n" * 2000))
    assert len(long) == MAX_CAUSE_CHARS and long.endswith("…") and "\n" not in long
    cpp = RuntimeError("bad magic\nException raised from load at foo.cpp:1\nframe #0: 0xdead")
    assert describe(cpp) == "RuntimeError: bad magic"
    assert load_failure(InvalidArgument("model 'm' version 1 has no model.pt")) == (
        "model 'm' version 1 has no model.pt"
    )


async def test_a_warm_up_that_raises_reports_the_models_own_exception(tmp_path: Path) -> None:
    config = testing.model_config(
        "warmfail", [("x", testing.FP32, [2])], [("y", testing.FP32, [2])]
    )
    testing.publish(str(tmp_path), config, testing.FailsWarmUp())
    served = repository(tmp_path)
    await served.poll_once()
    assert index_rows(served)[("warmfail", "1")] == (
        "UNAVAILABLE",
        "load failed: RuntimeError: stoll",
    )
    with pytest.raises(Unavailable) as raised:
        await served.load("warmfail")
    assert raised.value.message == (
        "model 'warmfail' failed to load (version 1: load failed: RuntimeError: stoll)"
    )


# -- model files replaced in place ---------------------------------------------------------------


async def test_a_model_file_replaced_in_place_is_reloaded_before_the_old_one_goes(
    tmp_path: Path,
) -> None:
    old, new = testing.seeded(testing.MLP(), 1), testing.seeded(testing.MLP(), 2)
    testing.publish(str(tmp_path), testing.mlp_config(), old)
    loader = CountingLoader()
    served = repository(tmp_path, loader=loader)
    await served.poll_once()
    before = await served.acquire("mlp", "")
    x = torch.randn(3, 4)
    assert torch.allclose(await run(served, x), old(x))
    replace_in_place(tmp_path / "mlp" / "1" / "model.pt", testing.torchscript_bytes(new))
    await served.poll_once()
    assert loader.calls == [("mlp", 1), ("mlp", 1)]
    assert torch.allclose(await run(served, x), new(x))
    # The old load is not torn down under requests that hold it: it still answers.
    y = (await before.batcher.infer({"x": x}))["y"]
    assert isinstance(y, torch.Tensor) and torch.allclose(y, old(x))
    await served.poll_once()  # nothing changed since: nothing reloads
    assert len(loader.calls) == 2


async def test_a_new_stamp_on_the_same_bytes_does_not_reload(tmp_path: Path) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    loader = CountingLoader()
    served = repository(tmp_path, loader=loader)
    await served.poll_once()
    path = tmp_path / "mlp" / "1" / "model.pt"
    replace_in_place(path, path.read_bytes())  # new inode and mtime, same content
    os.utime(path, ns=(1, 1))
    await served.poll_once()
    await served.poll_once()
    assert loader.calls == [("mlp", 1)]


async def test_a_replaced_file_that_fails_to_load_keeps_the_old_one_and_says_why(
    tmp_path: Path,
) -> None:
    old, new = testing.seeded(testing.MLP(), 1), testing.seeded(testing.MLP(), 3)
    testing.publish(str(tmp_path), testing.mlp_config(), old)
    loader = CountingLoader()
    served = repository(tmp_path, loader=loader)
    await served.poll_once()
    path = tmp_path / "mlp" / "1" / "model.pt"
    replace_in_place(path, b"half a model")
    await served.poll_once()
    x = torch.randn(2, 4)
    assert torch.allclose(await run(served, x), old(x))
    state, reason = index_rows(served)[("mlp", "1")]
    assert state == "READY"
    assert reason.startswith(
        "changed model file not loaded, previous one serving: load failed: RuntimeError: "
    )
    await served.poll_once()  # the same broken bytes are not retried on every poll
    assert len(loader.calls) == 2
    replace_in_place(path, testing.torchscript_bytes(new))
    await served.poll_once()
    assert torch.allclose(await run(served, x), new(x))
    assert index_rows(served)[("mlp", "1")] == ("READY", "")


# -- config overrides ---------------------------------------------------------------------------


def load_request(config: str | None = None, **files: bytes) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name="mlp")
    if config is not None:
        request.parameters["config"].string_param = config
    for name, data in files.items():
        request.parameters[f"file:{name}"].bytes_param = data
    return request


def test_load_parameters_are_parsed_or_refused_by_name() -> None:
    assert config_override("mlp", load_request().parameters) is None
    parsed = config_override(
        "mlp",
        load_request(
            '{"max_batch_size": 8, "input": [{"name": "x", "data_type": "TYPE_FP32", '
            '"dims": [4]}], "output": [{"name": "y", "dataType": "TYPE_FP32", "dims": [3]}]}'
        ).parameters,
    )
    assert parsed == testing.mlp_config(max_batch_size=8, queue_delay_us=None, platform="")
    with pytest.raises(InvalidArgument, match=r"^load parameter\(s\) file:1/model.pt: model files"):
        config_override("mlp", load_request("{}", **{"1/model.pt": b"x"}).parameters)
    with pytest.raises(InvalidArgument, match=r"^load parameter 'config' is not a valid JSON"):
        config_override("mlp", load_request('{"max_batch_size": "many"}').parameters)
    with pytest.raises(InvalidArgument, match=r"names model 'other', but the request loads 'mlp'"):
        config_override("mlp", load_request('{"name": "other"}').parameters)
    odd = load_request()
    odd.parameters["config"].bytes_param = b"{}"
    odd.parameters["color"].bool_param = True
    with pytest.raises(InvalidArgument, match=r"^unknown load parameter\(s\) color; supported"):
        config_override("mlp", odd.parameters)
    del odd.parameters["color"]
    with pytest.raises(InvalidArgument, match=r"must be a string \(a JSON model config\)"):
        config_override("mlp", odd.parameters)


async def test_a_config_override_serves_until_a_load_without_one(tmp_path: Path) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    served = repository(tmp_path)
    await served.poll_once()
    override = testing.mlp_config(max_batch_size=4, queue_delay_us=None)
    await served.load("mlp", override)
    assert (await served.acquire("mlp", "")).model.signature.max_batch_size == 4
    await served.poll_once()  # the repository's config does not win it back
    assert served.state("mlp").config == override
    await served.load("mlp")
    assert (await served.acquire("mlp", "")).model.signature.max_batch_size == 16


async def test_an_override_that_fails_to_load_leaves_the_loaded_model_serving(
    tmp_path: Path,
) -> None:
    testing.publish(str(tmp_path), testing.mlp_config(), testing.seeded(testing.MLP(), 1))
    served = repository(tmp_path)
    await served.poll_once()
    before = await served.acquire("mlp", "")
    wrong = testing.model_config("mlp", [("x", testing.FP32, [5])], [("y", testing.FP32, [3])])
    with pytest.raises(Unavailable) as raised:
        await served.load("mlp", wrong)  # the warm-up multiplies [1, 5] by a [4, 8] weight
    assert raised.value.message.startswith(
        "model 'mlp' cannot load: config change rejected: version 1: load failed: RuntimeError: "
    )
    assert await served.acquire("mlp", "") is before
    await served.poll_once()
    assert served.state("mlp").config == testing.mlp_config()
    assert index_rows(served)[("mlp", "1")] == ("READY", "")
    with pytest.raises(InvalidArgument, match="config must declare inputs and outputs"):
        await served.load("mlp", testing.model_config("mlp", [], []))
