"""Publishing: the first version writes the model's config; later ones keep the operator's edits."""

from __future__ import annotations

from pathlib import Path

from protos.inference import model_config_pb2 as mc
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from workers.model_repo import ModelRepo
from workers.training.publish import publish


def dataset() -> data_pb2.Dataset:
    schema = data_pb2.Schema(
        features=[data_pb2.TensorSpec(name="x", data_type=data_pb2.DATA_TYPE_FP32, shape=[4])],
        labels=[data_pb2.TensorSpec(name="y", data_type=data_pb2.DATA_TYPE_INT64, shape=[])],
        task=data_pb2.TASK_CLASSIFICATION,
        num_classes=3,
    )
    return data_pb2.Dataset(name="blobs", version="1", schema=schema)


def job(job_id: str) -> training_pb2.Job:
    return training_pb2.Job(id=job_id, spec=training_pb2.JobSpec(model_name="demo"))


def test_new_model_keeps_two_versions_servable(tmp_path: Path) -> None:
    repo = ModelRepo(str(tmp_path))
    published = publish(repo, job("a"), dataset(), b"weights", {"job_id": "a"})
    assert published.version == "1"
    config = repo.read_config("demo")
    assert config.version_policy.latest.num_versions == 2
    assert [i.name for i in config.input] == ["x"] and list(config.input[0].dims) == [4]


def test_a_later_version_leaves_the_operators_config_alone(tmp_path: Path) -> None:
    repo = ModelRepo(str(tmp_path))
    publish(repo, job("a"), dataset(), b"one", {"job_id": "a"})
    edited = repo.read_config("demo")
    edited.version_policy.CopyFrom(mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All()))
    edited.dynamic_batching.max_queue_delay_microseconds = 750
    repo.write_config("demo", edited)

    published = publish(repo, job("b"), dataset(), b"two", {"job_id": "b"})

    assert published.version == "2"
    assert repo.read_config("demo") == edited
    assert (tmp_path / "demo" / "2" / "model.pt").read_bytes() == b"two"
