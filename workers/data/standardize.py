"""Per-element mean and standard deviation of feature columns, and applying them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from workers.data.schema import Array, DType, TensorSpec

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FeatureStats:
    """Statistics of one feature column over the training split, per element (flattened)."""

    name: str
    mean: tuple[float, ...]
    #: Population standard deviation; elements that never vary get 1 so that
    #: standardising them only centres them instead of dividing by zero.
    std: tuple[float, ...]


def as_float64(array: Array, dtype: DType) -> Floats:
    """The values of a column as float64 (BF16 bit patterns decoded)."""
    if dtype is DType.BF16:
        bits = array.astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32).astype(np.float64)
    return array.astype(np.float64)


@dataclass
class RunningStats:
    """Streaming mean/variance of one column, merged chunk by chunk (Chan et al.).

    Numerically stable where a naive sum of squares is not, and needs one chunk
    in memory at a time.
    """

    spec: TensorSpec
    count: int = 0
    mean: Floats = field(init=False)
    m2: Floats = field(init=False)

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.spec.elements, dtype=np.float64)
        self.m2 = np.zeros(self.spec.elements, dtype=np.float64)

    def update(self, rows: Array) -> None:
        """Adds examples (leading dimension = examples) of this column."""
        n = int(rows.shape[0])
        if n == 0:
            return
        values = as_float64(rows, self.spec.dtype).reshape(n, -1)
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def result(self) -> FeatureStats:
        if self.count == 0:
            std = np.ones_like(self.mean)
        else:
            std = np.sqrt(self.m2 / self.count)
            std[~(std > 1e-12)] = 1.0
        return FeatureStats(self.spec.name, tuple(map(float, self.mean)), tuple(map(float, std)))


def output_dtype(dtype: DType) -> DType:
    """Standardised features are FP32, except FP64 columns, which stay FP64."""
    return DType.FP64 if dtype is DType.FP64 else DType.FP32


def standardize(rows: Array, spec: TensorSpec, stats: FeatureStats) -> Array:
    """``(x - mean) / std`` per element, in :func:`output_dtype` of the column."""
    values = as_float64(rows, spec.dtype).reshape(rows.shape[0], -1)
    mean = np.asarray(stats.mean, dtype=np.float64)
    std = np.asarray(stats.std, dtype=np.float64)
    out = ((values - mean) / std).reshape(rows.shape)
    return out.astype(output_dtype(spec.dtype).numpy)
