"""JobSpec validation and the architecture catalogue: pure table tests, no sockets."""

from __future__ import annotations

import math

import pytest
import torch

from mesh.errors import InvalidArgument
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from workers.training import catalogue, export, spec
from workers.training.loop import lr_factor

from .conftest import mlp_spec


def dataset(
    shape: list[int], task: int = data_pb2.TASK_CLASSIFICATION, classes: int = 3
) -> data_pb2.Dataset:
    label_shape = [1] if task == data_pb2.TASK_REGRESSION else []
    return data_pb2.Dataset(
        name="d",
        version="1",
        num_train=100,
        num_validation=20,
        schema=data_pb2.Schema(
            features=[
                data_pb2.TensorSpec(name="x", data_type=data_pb2.DATA_TYPE_FP32, shape=shape)
            ],
            labels=[
                data_pb2.TensorSpec(
                    name="y",
                    data_type=data_pb2.DATA_TYPE_INT64
                    if task == data_pb2.TASK_CLASSIFICATION
                    else data_pb2.DATA_TYPE_FP32,
                    shape=label_shape,
                )
            ],
            task=task,  # type: ignore[arg-type]
            num_classes=classes if task == data_pb2.TASK_CLASSIFICATION else 0,
        ),
    )


def with_(mutate: str) -> training_pb2.JobSpec:
    s = mlp_spec()
    exec(mutate, {"s": s, "t": training_pb2})
    return s


@pytest.mark.parametrize(
    ("mutation", "field"),
    [
        ("s.optimizer.learning_rate = 0", "optimizer.learning_rate"),
        ("s.optimizer.learning_rate = -0.1", "optimizer.learning_rate"),
        ("s.optimizer.learning_rate = float('nan')", "optimizer.learning_rate"),
        ("s.epochs = 0", "epochs"),
        ("s.epochs = -3", "epochs"),
        ("s.batch_size = 0", "batch_size"),
        ("s.optimizer.kind = 0", "optimizer.kind"),
        ("s.optimizer.kind = 99", "optimizer.kind"),
        ("s.optimizer.momentum = 1.5", "optimizer.momentum"),
        ("s.optimizer.weight_decay = -1", "optimizer.weight_decay"),
        ("s.ClearField('architecture')", "architecture"),
        ("s.model_name = '../evil'", "model_name"),
        ("s.dataset.name = ''", "dataset.name"),
        ("s.schedule.kind = t.SCHEDULE_KIND_STEP", "schedule.step_size"),
        ("s.schedule.kind = 42", "schedule.kind"),
        ("s.world_size = -1", "world_size"),
        ("s.device = 'tpu'", "device"),
        ("s.checkpoint_interval_steps = -5", "checkpoint_interval_steps"),
    ],
)
def test_bad_specs_name_the_field(mutation: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        spec.validate_spec(with_(mutation))
    assert info.value.message.startswith(f"{field}:")


def test_a_model_name_too_long_for_a_directory_is_refused_before_training() -> None:
    """A 300-character name was accepted: the whole job trained, then failed to publish
    with "File name too long" and the repository's path in the error."""
    with pytest.raises(InvalidArgument, match=r"^model_name: at most 128 characters, got 300"):
        spec.validate_spec(with_("s.model_name = 'n' * 300"))
    spec.validate_spec(with_("s.model_name = 'n' * 128"))


def test_a_good_spec_passes_and_plans_equal_steps_per_rank() -> None:
    s = mlp_spec(world_size=3, batch_size=16)
    spec.validate_spec(s)
    d = dataset([4])
    d.num_train = 101  # shards of 34, 34, 33 examples: every rank takes ceil(33 / 16) steps
    plan = spec.plan(s, d)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 3 * s.epochs
    assert plan.checkpoint_every == 3 and plan.log_every == 5


@pytest.mark.parametrize(
    ("arch", "shape", "field"),
    [
        (training_pb2.Architecture(cnn=training_pb2.CnnSpec()), [4], "architecture.cnn"),
        (
            training_pb2.Architecture(cnn=training_pb2.CnnSpec(kernel_size=9)),
            [8, 8],
            "architecture.cnn.kernel_size",
        ),
        (
            training_pb2.Architecture(transformer=training_pb2.TransformerSpec()),
            [4],
            "architecture.transformer",
        ),
        (
            training_pb2.Architecture(
                transformer=training_pb2.TransformerSpec(d_model=10, num_heads=4)
            ),
            [5, 3],
            "architecture.transformer.num_heads",
        ),
        (
            training_pb2.Architecture(mlp=training_pb2.MlpSpec(hidden_sizes=[8, 0])),
            [4],
            "architecture.mlp.hidden_sizes",
        ),
        (
            training_pb2.Architecture(mlp=training_pb2.MlpSpec(activation="swish")),
            [4],
            "architecture.mlp.activation",
        ),
        (
            training_pb2.Architecture(mlp=training_pb2.MlpSpec(dropout=1.0)),
            [4],
            "architecture.mlp.dropout",
        ),
    ],
)
def test_architectures_that_do_not_fit_the_schema(
    arch: training_pb2.Architecture, shape: list[int], field: str
) -> None:
    s = mlp_spec()
    s.architecture.CopyFrom(arch)
    with pytest.raises(InvalidArgument) as info:
        spec.validate_against(s, dataset(shape))
    assert info.value.message.startswith(f"{field}:")


def test_schemas_the_catalogue_cannot_train_on() -> None:
    d = dataset([4])
    d.schema.features.add(name="z", data_type=data_pb2.DATA_TYPE_FP32)
    with pytest.raises(InvalidArgument, match=r"dataset\.schema\.features"):
        spec.validate_against(mlp_spec(), d)
    d = dataset([4], task=data_pb2.TASK_UNSPECIFIED)
    with pytest.raises(InvalidArgument, match=r"dataset\.schema\.task"):
        spec.validate_against(mlp_spec(), d)
    small = dataset([4])
    small.num_train = 10
    with pytest.raises(InvalidArgument, match="world_size"):
        spec.validate_against(mlp_spec(world_size=16), small)


@pytest.mark.parametrize(
    ("arch", "shape", "task"),
    [
        (
            training_pb2.Architecture(mlp=training_pb2.MlpSpec(activation="gelu", dropout=0.1)),
            [4],
            data_pb2.TASK_CLASSIFICATION,
        ),
        (training_pb2.Architecture(mlp=training_pb2.MlpSpec()), [3], data_pb2.TASK_REGRESSION),
        (
            training_pb2.Architecture(cnn=training_pb2.CnnSpec(channels=[4, 8])),
            [8, 8],
            data_pb2.TASK_CLASSIFICATION,
        ),
        (
            training_pb2.Architecture(cnn=training_pb2.CnnSpec(channels=[4])),
            [2, 6, 6],
            data_pb2.TASK_CLASSIFICATION,
        ),
        (
            training_pb2.Architecture(
                transformer=training_pb2.TransformerSpec(d_model=16, num_heads=2, num_layers=1)
            ),
            [6, 3],
            data_pb2.TASK_CLASSIFICATION,
        ),
    ],
)
def test_every_architecture_exports_torchscript_with_identical_outputs(
    arch: training_pb2.Architecture, shape: list[int], task: int
) -> None:
    sig = catalogue.signature_of(dataset(shape, task).schema)
    n = math.prod(shape)
    torch.manual_seed(0)
    network = catalogue.build(arch, sig, [0.5] * n, [2.0] * n).eval()
    loaded = export.load_torchscript(export.to_torchscript(network))
    x = torch.randn(5, *shape)
    with torch.no_grad():
        expected = network(x)
        assert torch.equal(loaded(x), expected)
    assert expected.shape == (5, *sig.output_shape)
    config = export.model_config("m", sig)
    assert list(config.input[0].dims) == shape and config.output[0].name == sig.output_name


def test_learning_rate_schedules() -> None:
    plan = spec.Plan(
        world_size=1, steps_per_epoch=10, total_steps=100, log_every=10, checkpoint_every=10
    )
    warm = training_pb2.Schedule(warmup_steps=4)
    assert [lr_factor(warm, plan, s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    step = training_pb2.Schedule(kind=training_pb2.SCHEDULE_KIND_STEP, step_size=2, gamma=0.5)
    assert [lr_factor(step, plan, s) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    cosine = training_pb2.Schedule(kind=training_pb2.SCHEDULE_KIND_COSINE)
    assert lr_factor(cosine, plan, 0) == 1.0
    assert lr_factor(cosine, plan, 50) == pytest.approx(0.5)
    assert lr_factor(cosine, plan, 100) == pytest.approx(0.0)
