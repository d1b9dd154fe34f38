"""Streaming statistics match numpy's, and standardising uses them per element."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.data.schema import DType, TensorSpec
from workers.data.standardize import RunningStats, as_float64, output_dtype, standardize

SPEC = TensorSpec("x", DType.FP64, (2, 2))


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_merged_chunks_give_numpys_mean_and_std(cuts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunks = [rng.normal(5.0, 3.0, size=(n, 2, 2)) for n in cuts]
    running = RunningStats(SPEC)
    for chunk in chunks:
        running.update(chunk)
    stats = running.result()
    everything = np.concatenate(chunks).reshape(-1, 4)
    if len(everything) == 0:
        assert stats.std == (1.0,) * 4
        return
    assert np.allclose(stats.mean, everything.mean(axis=0))
    expected_std = everything.std(axis=0)
    expected_std[expected_std <= 1e-12] = 1.0
    assert np.allclose(stats.std, expected_std)


def test_constant_elements_get_unit_std_and_are_only_centred() -> None:
    spec = TensorSpec("x", DType.FP32, (2,))
    rows = np.array([[1.0, 7.0], [3.0, 7.0]], dtype=np.float32)
    running = RunningStats(spec)
    running.update(rows)
    stats = running.result()
    assert stats.mean == (2.0, 7.0) and stats.std == (1.0, 1.0)
    out = standardize(rows, spec, stats)
    assert out.dtype == np.float32
    assert out.tolist() == [[-1.0, 0.0], [1.0, 0.0]]


def test_integer_and_bf16_columns_standardise_to_fp32() -> None:
    assert output_dtype(DType.INT32) is DType.FP32
    assert output_dtype(DType.FP64) is DType.FP64
    # bf16 of 1.0 is 0x3F80, of -2.0 is 0xC000.
    bits = np.array([[0x3F80], [0xC000]], dtype="<u2")
    assert as_float64(bits, DType.BF16).ravel().tolist() == [1.0, -2.0]
