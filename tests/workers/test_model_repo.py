"""The shared model-repository layout: config round trip, atomic numbered publishing."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos.inference import model_config_pb2 as mc
from workers.model_repo import ModelRepo, RepositoryError


def test_config_round_trips_through_text_format(tmp_path: Path) -> None:
    repo = ModelRepo(str(tmp_path))
    config = mc.ModelConfig(name="mlp", platform="pytorch_libtorch", max_batch_size=32)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[-1, 4])
    config.dynamic_batching.max_queue_delay_microseconds = 500
    repo.write_config("mlp", config)
    assert (tmp_path / "mlp" / "config.pbtxt").read_text().startswith('name: "mlp"')
    assert repo.read_config("mlp") == config
    assert repo.list_models() == ["mlp"]
    assert not [p for p in (tmp_path / "mlp").iterdir() if p.name.endswith(".tmp")]


def test_publish_numbers_versions_and_skips_temporary_names(tmp_path: Path) -> None:
    repo = ModelRepo(str(tmp_path))
    assert repo.publish_version("m", {"model.pt": b"one"}, {"job": "a"}) == 1
    (tmp_path / "m" / ".tmp-abandoned").mkdir()
    (tmp_path / "m" / "notaversion").mkdir()
    (tmp_path / "m" / "007").mkdir()
    assert repo.publish_version("m", {"model.pt": b"two"}) == 2
    assert repo.list_versions("m") == [1, 2]
    assert (tmp_path / "m" / "2" / "model.pt").read_bytes() == b"two"
    assert repo.read_lineage("m", 1) == {"job": "a"}
    assert repo.read_lineage("m", 2) == {}
    leftovers = [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [".tmp-abandoned"]


def test_missing_or_malformed_config_is_a_clear_error(tmp_path: Path) -> None:
    repo = ModelRepo(str(tmp_path))
    with pytest.raises(RepositoryError, match=r"no config\.pbtxt"):
        repo.read_config("ghost")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.pbtxt").write_text("max_batch_size: banana")
    with pytest.raises(RepositoryError, match=r"model 'bad': config\.pbtxt does not parse") as bad:
        repo.read_config("bad")
    assert str(tmp_path) not in str(bad.value)  # clients see it: no server paths
