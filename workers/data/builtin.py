"""Built-in dataset sources: seeded synthetic generators and scikit-learn's digits."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import numpy as np

from mesh.errors import FailedPrecondition, InvalidArgument
from workers.data.schema import Array, DType, Schema, Task, TensorSpec

#: Bounds that keep one generated dataset comfortably in one worker's memory.
MAX_EXAMPLES = 10_000_000
MAX_ELEMENTS = 100_000_000
#: Classes a built-in classification dataset may have.
MAX_CLASSES = 1000


@dataclass(frozen=True)
class Blobs:
    """Gaussian blobs, one isotropic cluster per class. Zeros mean the defaults."""

    num_examples: int
    num_classes: int = 3
    num_features: int = 2
    cluster_std: float = 1.0


@dataclass(frozen=True)
class Spirals:
    """Interleaved spiral arms in the plane, one per class, with Gaussian noise."""

    num_examples: int
    num_classes: int = 2
    noise: float = 0.05


@dataclass(frozen=True)
class Regression:
    """``y = x @ w + b + noise`` with standard normal features and fixed hidden weights."""

    num_examples: int
    num_features: int = 4
    noise: float = 0.1


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes)."""


Source = Blobs | Spirals | Regression | Digits


@dataclass(frozen=True)
class Generated:
    """A generated dataset: columns keyed by name, its schema and where it came from."""

    columns: dict[str, Array]
    schema: Schema
    source: str
    description: str


def _check_size(num_examples: int, width: int) -> None:
    if not 1 <= num_examples <= MAX_EXAMPLES:
        raise InvalidArgument(f"num_examples must be in [1, {MAX_EXAMPLES}], got {num_examples}")
    if num_examples * width > MAX_ELEMENTS:
        raise InvalidArgument(
            f"{num_examples} examples of {width} features exceed the built-in limit of "
            f"{MAX_ELEMENTS} elements; upload larger datasets instead"
        )


def _check_classes(kind: str, num_classes: int) -> None:
    # The class centres are num_classes x num_features (a billion classes was a
    # MemoryError, INTERNAL), and a model trained on them has an output per class.
    if not 2 <= num_classes <= MAX_CLASSES:
        raise InvalidArgument(
            f"{kind} need num_classes >= 2 and num_classes <= {MAX_CLASSES}, got {num_classes}"
        )


def _check_noise(kind: str, noise: float) -> None:
    """``kind``: "spirals need", "regression needs"."""
    # NaN passed a "< 0" test and infinity any: a dataset of NaN or inf was written.
    if not (noise >= 0 and math.isfinite(noise)):
        raise InvalidArgument(f"{kind} noise >= 0 (finite), got {noise}")


def _classification(x: Array, y: Array, num_classes: int, source: str, text: str) -> Generated:
    features = (TensorSpec("x", DType.FP32, (x.shape[1],)),)
    labels = (TensorSpec("y", DType.INT64, ()),)
    schema = Schema(features, labels, Task.CLASSIFICATION, num_classes)
    columns: dict[str, Array] = {"x": x.astype(np.float32), "y": y.astype(np.int64)}
    return Generated(columns, schema, source, text)


def blobs(spec: Blobs, seed: int) -> Generated:
    _check_classes("blobs", spec.num_classes)
    if spec.num_features < 1:
        raise InvalidArgument(f"blobs need num_features >= 1, got {spec.num_features}")
    if not (spec.cluster_std > 0 and math.isfinite(spec.cluster_std)):
        raise InvalidArgument(f"blobs need cluster_std > 0 (finite), got {spec.cluster_std}")
    _check_size(spec.num_examples, spec.num_features)
    rng = np.random.Generator(np.random.PCG64(seed))
    centers = rng.uniform(-10.0, 10.0, size=(spec.num_classes, spec.num_features))
    y = rng.integers(0, spec.num_classes, size=spec.num_examples)
    x = centers[y] + rng.normal(0.0, spec.cluster_std, size=(spec.num_examples, spec.num_features))
    text = (
        f"{spec.num_classes} Gaussian blobs in {spec.num_features} dimensions "
        f"(std {spec.cluster_std}, seed {seed})"
    )
    return _classification(x, y, spec.num_classes, "builtin:blobs", text)


def spirals(spec: Spirals, seed: int) -> Generated:
    _check_classes("spirals", spec.num_classes)
    _check_noise("spirals need", spec.noise)
    _check_size(spec.num_examples, 2)
    rng = np.random.Generator(np.random.PCG64(seed))
    y = rng.integers(0, spec.num_classes, size=spec.num_examples)
    # Radius grows with the angle; each arm is the same curve rotated by 2*pi/k.
    t = rng.uniform(0.0, 1.0, size=spec.num_examples)
    angle = 4.0 * np.pi * t + 2.0 * np.pi * y / spec.num_classes
    radius = t
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    x += rng.normal(0.0, spec.noise, size=x.shape)
    text = f"{spec.num_classes} interleaved spirals (noise {spec.noise}, seed {seed})"
    return _classification(x, y, spec.num_classes, "builtin:spirals", text)


def regression(spec: Regression, seed: int) -> Generated:
    if spec.num_features < 1:
        raise InvalidArgument(f"regression needs num_features >= 1, got {spec.num_features}")
    _check_noise("regression needs", spec.noise)
    _check_size(spec.num_examples, spec.num_features)
    rng = np.random.Generator(np.random.PCG64(seed))
    weights = rng.normal(0.0, 1.0, size=spec.num_features)
    bias = rng.normal()
    x = rng.normal(0.0, 1.0, size=(spec.num_examples, spec.num_features))
    y = x @ weights + bias + rng.normal(0.0, spec.noise, size=spec.num_examples)
    schema = Schema(
        (TensorSpec("x", DType.FP32, (spec.num_features,)),),
        (TensorSpec("y", DType.FP32, (1,)),),
        Task.REGRESSION,
    )
    columns: dict[str, Array] = {
        "x": x.astype(np.float32),
        "y": y.reshape(-1, 1).astype(np.float32),
    }
    text = f"linear regression in {spec.num_features} dimensions (noise {spec.noise}, seed {seed})"
    return Generated(columns, schema, "builtin:regression", text)


def digits() -> Generated:
    """The digits shipped inside scikit-learn; needs the optional ``datasets`` extra."""
    try:
        sk_datasets = importlib.import_module("sklearn.datasets")
    except ImportError as exc:
        raise FailedPrecondition(
            "the digits dataset needs scikit-learn, which is not installed on this data "
            "worker: install the 'datasets' extra (pip install 'meshserve[datasets]')"
        ) from exc
    bunch = sk_datasets.load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)  # 64 pixel intensities in [0, 16]
    y = np.asarray(bunch.target, dtype=np.int64)
    return _classification(
        x, y, 10, "builtin:digits", "scikit-learn 8x8 handwritten digits (1797 images)"
    )


def generate(source: Source, seed: int) -> Generated:
    """Runs one source; the same source and seed always give the same arrays."""
    if not 0 <= seed < 2**64:
        raise InvalidArgument(f"seed must fit in 64 unsigned bits, got {seed}")
    match source:
        case Blobs():
            return blobs(source, seed)
        case Spirals():
            return spirals(source, seed)
        case Regression():
            return regression(source, seed)
        case Digits():
            return digits()
