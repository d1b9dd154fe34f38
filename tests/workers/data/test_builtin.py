"""Built-in generators: deterministic, shaped as their schemas say, optional digits."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from mesh.errors import FailedPrecondition, InvalidArgument
from workers.data import builtin
from workers.data.schema import RawTensor, decode_chunk, validate_schema

SOURCES: list[builtin.Source] = [
    builtin.Blobs(200, num_classes=4, num_features=3),
    builtin.Spirals(150, num_classes=3),
    builtin.Regression(120, num_features=5),
]


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: type(s).__name__)
def test_generators_are_deterministic_and_match_their_schema(source: builtin.Source) -> None:
    first = builtin.generate(source, seed=11)
    second = builtin.generate(source, seed=11)
    other = builtin.generate(source, seed=12)
    validate_schema(first.schema)
    for name, array in first.columns.items():
        assert np.array_equal(array, second.columns[name])
    assert not np.array_equal(first.columns["x"], other.columns["x"])
    # The generated arrays pass the same checks as an upload would.
    tensors = [
        RawTensor(
            spec.name,
            spec.dtype,
            first.columns[spec.name].shape,
            first.columns[spec.name].tobytes(),
        )
        for spec in first.schema.columns
    ]
    decoded = decode_chunk(first.schema, tensors, 0)
    assert decoded["x"].shape[0] == source.num_examples  # type: ignore[union-attr]


def test_blob_labels_cover_the_classes() -> None:
    generated = builtin.generate(builtin.Blobs(500, num_classes=5, num_features=2), seed=0)
    assert set(generated.columns["y"].tolist()) == set(range(5))
    assert generated.schema.num_classes == 5


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (builtin.Blobs(0), "num_examples must be in"),
        (builtin.Blobs(10, num_classes=1), "num_classes >= 2"),
        (builtin.Blobs(10, cluster_std=-1.0), "cluster_std > 0"),
        (builtin.Spirals(10, noise=-0.1), "noise >= 0"),
        # Were accepted (a dataset of NaN or inf) or failed INTERNAL (MemoryError).
        (builtin.Blobs(10, cluster_std=math.inf), "cluster_std > 0"),
        (builtin.Spirals(10, noise=math.nan), "noise >= 0"),
        (builtin.Regression(10, noise=math.inf), "noise >= 0"),
        (builtin.Regression(10, noise=math.nan), "noise >= 0"),
        (builtin.Blobs(10, num_classes=10**9), "num_classes <= 1000"),
        (builtin.Spirals(10, num_classes=10**9), "num_classes <= 1000"),
        (builtin.Regression(10, num_features=0), "num_features >= 1"),
        (builtin.Regression(builtin.MAX_EXAMPLES, num_features=1000), "exceed the built-in limit"),
    ],
)
def test_bad_generator_settings_are_rejected(source: builtin.Source, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        builtin.generate(source, seed=0)


def test_digits_without_scikit_learn_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(FailedPrecondition, match=r"install the 'datasets' extra"):
        builtin.generate(builtin.Digits(), seed=0)


def test_digits_with_scikit_learn_has_1797_images() -> None:
    pytest.importorskip("sklearn")
    generated = builtin.generate(builtin.Digits(), seed=0)
    assert generated.columns["x"].shape == (1797, 64)
    assert generated.schema.num_classes == 10
