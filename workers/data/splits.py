"""Deterministic train/validation/test assignment and the per-epoch batch order."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from mesh.errors import InvalidArgument

Indices = npt.NDArray[np.int64]

#: Validation fraction used when a SplitSpec sets neither fraction.
DEFAULT_VALIDATION_FRACTION = 0.2


class SplitKind(Enum):
    """One partition of a dataset."""

    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"
    ALL = "all"


@dataclass(frozen=True)
class SplitSpec:
    """How examples are divided: fractions for validation and test, and the seed."""

    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    test_fraction: float = 0.0
    seed: int = 0

    @classmethod
    def of(cls, validation_fraction: float, test_fraction: float, seed: int) -> SplitSpec:
        """A validated spec; both fractions zero means the default validation fraction."""
        if validation_fraction == 0 and test_fraction == 0:
            validation_fraction = DEFAULT_VALIDATION_FRACTION
        for what, value in (
            ("validation_fraction", validation_fraction),
            ("test_fraction", test_fraction),
        ):
            if not 0 <= value < 1:
                raise InvalidArgument(f"split {what} must be in [0, 1), got {value}")
        if validation_fraction + test_fraction >= 1:
            raise InvalidArgument(
                "split validation_fraction + test_fraction must be < 1 so training keeps "
                f"examples, got {validation_fraction} + {test_fraction}"
            )
        if not 0 <= seed < 2**64:
            raise InvalidArgument(f"split seed must fit in 64 unsigned bits, got {seed}")
        return cls(validation_fraction, test_fraction, seed)


@dataclass(frozen=True)
class Partition:
    """Positions (in stored order, ascending) of the examples of each split."""

    train: Indices
    validation: Indices
    test: Indices

    def get(self, kind: SplitKind, num_examples: int) -> Indices:
        if kind is SplitKind.ALL:
            return np.arange(num_examples, dtype=np.int64)
        return {
            SplitKind.TRAIN: self.train,
            SplitKind.VALIDATION: self.validation,
            SplitKind.TEST: self.test,
        }[kind]


def partition(num_examples: int, spec: SplitSpec) -> Partition:
    """Assigns each example to one split, as a pure function of (num_examples, spec).

    A seeded permutation puts the first ``round(n * test_fraction)`` examples in
    test and the next ``round(n * validation_fraction)`` in validation; the rest
    train. Training never ends up empty when there is at least one example.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    order = np.random.Generator(np.random.PCG64(spec.seed)).permutation(num_examples)
    n_test = min(round(num_examples * spec.test_fraction), max(num_examples - 1, 0))
    n_val = min(round(num_examples * spec.validation_fraction), max(num_examples - 1 - n_test, 0))
    test = np.sort(order[:n_test]).astype(np.int64)
    validation = np.sort(order[n_test : n_test + n_val]).astype(np.int64)
    train = np.sort(order[n_test + n_val :]).astype(np.int64)
    return Partition(train=train, validation=validation, test=test)


@dataclass(frozen=True)
class EpochRequest:
    """What one reader asks for in one epoch."""

    split: SplitKind
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    drop_last: bool = False
    num_shards: int = 1
    shard_index: int = 0

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise InvalidArgument(f"batch_size must be positive, got {self.batch_size}")
        if self.num_shards < 1:
            raise InvalidArgument(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise InvalidArgument(
                f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}"
            )
        if not 0 <= self.seed < 2**64 or not 0 <= self.epoch < 2**64:
            raise InvalidArgument("seed and epoch must fit in 64 unsigned bits")


def epoch_order(indices: Indices, request: EpochRequest) -> Indices:
    """The order in which ``indices`` are read this epoch, for this reader's shard.

    Shuffling draws from PCG64 seeded with (seed, epoch), so the order is a pure
    function of the request: every reader of every shard computes the same
    permutation and takes positions ``shard_index, shard_index + num_shards, ...``.
    """
    if request.shuffle:
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([request.seed, request.epoch]))
        )
        ordered = rng.permutation(indices)
    else:
        ordered = indices
    return np.ascontiguousarray(ordered[request.shard_index :: request.num_shards], dtype=np.int64)


def batches(order: Indices, batch_size: int, drop_last: bool) -> list[Indices]:
    """Cuts an epoch order into consecutive batches."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i : min(i + batch_size, stop)] for i in range(0, stop, batch_size)]


def plan_epoch(num_examples: int, spec: SplitSpec, request: EpochRequest) -> list[Indices]:
    """Every batch of one epoch for one reader: positions in the dataset's stored order."""
    indices = partition(num_examples, spec).get(request.split, num_examples)
    return batches(epoch_order(indices, request), request.batch_size, request.drop_last)


def windows(plan: list[Indices], max_examples: int) -> list[list[Indices]]:
    """Groups consecutive batches so that each group holds at most ``max_examples``
    examples (but always at least one batch).

    Reading a group at once reads each chunk file it touches once, instead of
    once per batch: what keeps a shuffled epoch over a dataset larger than the
    chunk cache from re-reading every chunk for nearly every batch.
    """
    groups: list[list[Indices]] = []
    size = 0
    for batch in plan:
        if groups and size + len(batch) <= max_examples:
            groups[-1].append(batch)
            size += len(batch)
        else:
            groups.append([batch])
            size = len(batch)
    return groups
