"""The built-in architecture catalogue: builds a network that fits a dataset's schema.

Every network takes one feature column and produces one output column. The
feature standardisation (training-split mean and std) is a buffer of the network
itself, so the exported TorchScript takes raw features exactly as stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mesh.errors import InvalidArgument
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
DEFAULT_MLP_HIDDEN = (64, 64)
DEFAULT_CNN_CHANNELS = (16, 32)


@dataclass(frozen=True)
class Signature:
    """What a network consumes and produces, taken from a dataset schema."""

    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    task: int  # data_pb2.Task
    num_classes: int
    label_name: str
    label_shape: tuple[int, ...]

    @property
    def is_classification(self) -> bool:
        return self.task == data_pb2.TASK_CLASSIFICATION


def signature_of(schema: data_pb2.Schema) -> Signature:
    """Checks that ``schema`` is one the catalogue can train on; raises InvalidArgument."""
    if len(schema.features) != 1:
        raise InvalidArgument(
            f"dataset.schema.features: the catalogue trains on exactly one feature column, "
            f"the dataset has {len(schema.features)}"
        )
    if len(schema.labels) != 1:
        raise InvalidArgument(
            f"dataset.schema.labels: the catalogue trains on exactly one label column, "
            f"the dataset has {len(schema.labels)}"
        )
    feature, label = schema.features[0], schema.labels[0]
    label_shape = tuple(int(d) for d in label.shape)
    if schema.task == data_pb2.TASK_CLASSIFICATION:
        if schema.num_classes < 2:
            raise InvalidArgument(
                f"dataset.schema.num_classes: classification needs at least 2 classes, "
                f"got {schema.num_classes}"
            )
        if math.prod(label_shape) != 1:
            raise InvalidArgument(
                f"dataset.schema.labels: classification needs one class index per example, "
                f"label {label.name!r} has shape {list(label_shape)}"
            )
        output_name, output_shape = "logits", (int(schema.num_classes),)
    elif schema.task == data_pb2.TASK_REGRESSION:
        output_name, output_shape = "prediction", (max(1, math.prod(label_shape)),)
    else:
        raise InvalidArgument("dataset.schema.task: the dataset declares no task to train for")
    return Signature(
        input_name=feature.name,
        input_shape=tuple(int(d) for d in feature.shape),
        output_name=output_name,
        output_shape=output_shape,
        task=int(schema.task),
        num_classes=int(schema.num_classes),
        label_name=label.name,
        label_shape=label_shape,
    )


def _check_dropout(field: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise InvalidArgument(f"{field}: dropout must be in [0, 1), got {value}")


def _check_positive(field: str, values: Sequence[int]) -> None:
    for value in values:
        if value <= 0:
            raise InvalidArgument(f"{field}: must be positive, got {list(values)}")


class Standardize(nn.Module):
    """Subtracts the training mean and divides by the training std, per element."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Buffers are typed Tensor | Module to mypy; a class-level annotation would fix that
        # but TorchScript cannot resolve string annotations under postponed evaluation.
        return (x - self.mean) / self.std  # type: ignore[operator]


class Network(nn.Module):
    """Input cast and standardisation, a body from the catalogue, an output head."""

    def __init__(self, standardize: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.standardize = standardize
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(self.standardize(x.to(torch.float32)))
        return out


class Mlp(nn.Module):
    def __init__(
        self, in_features: int, hidden: Sequence[int], activation: str, dropout: float, out: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(1)]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class Cnn(nn.Module):
    """Conv blocks (conv, ReLU, 2x2 max-pool while the map is at least 2x2), dense, head."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: Sequence[int],
        kernel_size: int,
        hidden: int,
        dropout: float,
        out: int,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = [c, h, w]
        blocks: list[nn.Module] = []
        for width in channels:
            blocks += [nn.Conv2d(c, width, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            c = width
            if h >= 2 and w >= 2:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.Flatten(1), nn.Linear(c * h * w, hidden), nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, out))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript cannot script list unpacking; concatenation it can.
        x = x.reshape([x.shape[0]] + self.image_shape)  # noqa: RUF005
        out: torch.Tensor = self.head(self.features(x))
        return out


class SequenceEncoder(nn.Module):
    """Input projection, learned positions, Transformer encoder, mean-pool, head."""

    def __init__(
        self,
        length: int,
        in_dim: int,
        d_model: int,
        heads: int,
        layers: int,
        ff: int,
        dropout: float,
        out: int,
    ) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, d_model)
        self.position = nn.Parameter(torch.zeros(1, length, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, ff, dropout, batch_first=True, norm_first=True
        )
        # The nested-tensor fast path only applies with padding masks, which fixed-length
        # sequences never have; turning it off also keeps the module scriptable quietly.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.project(x) + self.position)
        out: torch.Tensor = self.head(self.norm(h.mean(dim=1)))
        return out


def validate(arch: training_pb2.Architecture, sig: Signature) -> None:
    """Raises InvalidArgument naming the field when ``arch`` is bad or does not fit ``sig``."""
    kind = arch.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("architecture: choose one of mlp, cnn, transformer")
    shape = sig.input_shape
    if kind == "mlp":
        _check_positive("architecture.mlp.hidden_sizes", list(arch.mlp.hidden_sizes))
        if arch.mlp.activation and arch.mlp.activation not in ACTIVATIONS:
            raise InvalidArgument(
                f"architecture.mlp.activation: unknown activation {arch.mlp.activation!r}; "
                f"choose one of {', '.join(ACTIVATIONS)}"
            )
        _check_dropout("architecture.mlp.dropout", arch.mlp.dropout)
    elif kind == "cnn":
        cnn = arch.cnn
        _check_positive("architecture.cnn.channels", list(cnn.channels))
        _check_positive("architecture.cnn.kernel_size", [cnn.kernel_size or 3])
        _check_positive("architecture.cnn.hidden_size", [cnn.hidden_size or 64])
        _check_dropout("architecture.cnn.dropout", cnn.dropout)
        if len(shape) not in (2, 3):
            raise InvalidArgument(
                f"architecture.cnn: needs [C, H, W] or [H, W] features, "
                f"feature {sig.input_name!r} has shape {list(shape)}"
            )
        if (cnn.kernel_size or 3) > min(shape[-2:]):
            raise InvalidArgument(
                f"architecture.cnn.kernel_size: {cnn.kernel_size} is larger than the "
                f"{shape[-2]}x{shape[-1]} feature map"
            )
    else:
        tf = arch.transformer
        d_model = tf.d_model or 32
        heads = tf.num_heads or 4
        _check_positive("architecture.transformer.d_model", [d_model])
        _check_positive("architecture.transformer.num_heads", [heads])
        _check_positive("architecture.transformer.num_layers", [tf.num_layers or 2])
        _check_positive("architecture.transformer.dim_feedforward", [tf.dim_feedforward or 1])
        _check_dropout("architecture.transformer.dropout", tf.dropout)
        if d_model % heads:
            raise InvalidArgument(
                f"architecture.transformer.num_heads: {heads} does not divide d_model {d_model}"
            )
        if len(shape) != 2:
            raise InvalidArgument(
                f"architecture.transformer: needs [T, D] sequence features, "
                f"feature {sig.input_name!r} has shape {list(shape)}"
            )
    if any(d <= 0 for d in shape):
        raise InvalidArgument(
            f"dataset.schema.features: feature {sig.input_name!r} needs fixed positive "
            f"dimensions, has shape {list(shape)}"
        )


def build(
    arch: training_pb2.Architecture,
    sig: Signature,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Network:
    """Builds the network for ``arch`` on ``sig``; mean/std enable standardisation."""
    validate(arch, sig)
    shape = sig.input_shape
    out = sig.output_shape[0]
    body: nn.Module
    kind = arch.WhichOneof("kind")
    if kind == "mlp":
        mlp = arch.mlp
        body = Mlp(
            math.prod(shape),
            list(mlp.hidden_sizes) or DEFAULT_MLP_HIDDEN,
            mlp.activation or "relu",
            mlp.dropout,
            out,
        )
    elif kind == "cnn":
        cnn = arch.cnn
        image = (1, shape[0], shape[1]) if len(shape) == 2 else (shape[0], shape[1], shape[2])
        body = Cnn(
            image,
            list(cnn.channels) or DEFAULT_CNN_CHANNELS,
            cnn.kernel_size or 3,
            cnn.hidden_size or 64,
            cnn.dropout,
            out,
        )
    else:
        tf = arch.transformer
        d_model = tf.d_model or 32
        body = SequenceEncoder(
            shape[0],
            shape[1],
            d_model,
            tf.num_heads or 4,
            tf.num_layers or 2,
            tf.dim_feedforward or 4 * d_model,
            tf.dropout,
            out,
        )
    standardize: nn.Module = nn.Identity()
    if mean is not None and std is not None:
        standardize = Standardize(
            torch.tensor(list(mean), dtype=torch.float32).reshape(shape),
            torch.tensor(list(std), dtype=torch.float32).reshape(shape),
        )
    return Network(standardize, body)
