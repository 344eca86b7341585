"""The built-in strategies of actsparse-masks: magnitude_mask, sum_aggregate, mean_over_batch."""

from __future__ import annotations

import importlib.metadata
import math
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.core import (
    AggregateStrategy,
    ConfigError,
    MaskStrategy,
    ReduceStrategy,
    get_registry,
)
from actsparse.masks import magnitude_mask, mean_over_batch, sum_aggregate

DTYPES = {"float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
levels = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False),
    st.sampled_from([0, 1, 0.0, 1.0, 0.5, 0.25, 1 / 3, 0.1]),
)


@st.composite
def tensors(draw: st.DrawFn, shape: Any = shapes) -> torch.Tensor:
    np_dtype, _ = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    width = 32 if np_dtype is np.float32 else 64
    tied = draw(st.booleans())
    if tied:
        # few distinct magnitudes, both signs, signed zeros: many ties
        elements = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0])
    else:
        elements = st.floats(width=width, allow_nan=False, allow_infinity=False)
    array = draw(hnp.arrays(np_dtype, draw(shape), elements=elements))
    return torch.from_numpy(array)


def reference_magnitude_mask(data: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """abs, flatten, torch.sort ascending, take the first round(level * n) indices,
    scatter zeros into ones_like, reshape."""
    flat = torch.flatten(torch.abs(data))
    ascending = torch.sort(flat, descending=False).indices
    k = round(sparsity_level * flat.numel())
    chosen = ascending[:k]
    out = torch.scatter(torch.ones_like(flat), 0, chosen, 0.0)
    return out.reshape(data.shape)


# ------------------------------------------------------------ magnitude_mask


@settings(max_examples=200, deadline=None)
@given(data=tensors(), level=levels)
def test_magnitude_mask_is_bit_identical_to_the_reference(data: torch.Tensor, level: float) -> None:
    original = data.clone()
    mask = magnitude_mask(data, level)
    expected = reference_magnitude_mask(data, level)
    assert mask.dtype == data.dtype
    assert mask.shape == data.shape
    assert mask.numpy().tobytes() == expected.numpy().tobytes()
    assert data.numpy().tobytes() == original.numpy().tobytes(), "input was modified"


@settings(max_examples=200, deadline=None)
@given(data=tensors(), level=levels)
def test_magnitude_mask_properties(data: torch.Tensor, level: float) -> None:
    mask = magnitude_mask(data, level)
    n = data.numel()
    n_zero = int((mask == 0).sum())
    assert n_zero == round(level * n)
    assert int((mask == 1).sum()) == n - n_zero  # only zeros and ones
    if 0 < n_zero < n:
        magnitudes = data.abs()
        # every zeroed entry is no larger than every kept one
        assert magnitudes[mask == 0].max() <= magnitudes[mask == 1].min()


@given(data=tensors())
def test_magnitude_mask_extremes(data: torch.Tensor) -> None:
    assert torch.equal(magnitude_mask(data, 0), torch.ones_like(data))
    assert torch.equal(magnitude_mask(data, 0.0), torch.ones_like(data))
    assert torch.equal(magnitude_mask(data, 1), torch.zeros_like(data))
    assert torch.equal(magnitude_mask(data, 1.0), torch.zeros_like(data))


def test_magnitude_mask_example() -> None:
    mask = magnitude_mask(torch.tensor([[3.0, -1.0], [0.5, -4.0]]), 0.5)
    assert torch.equal(mask, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # round half to even, as Python's round: 0.5 * 5 = 2.5 -> 2
    assert int((magnitude_mask(torch.arange(5.0), 0.5) == 0).sum()) == 2
    assert int((magnitude_mask(torch.arange(10.0), 0.3) == 0).sum()) == 3


@pytest.mark.parametrize(
    "level", [-0.01, 1.0000001, -1, 2, math.inf, -math.inf, math.nan], ids=repr
)
def test_out_of_range_sparsity_level_is_a_config_error(level: float) -> None:
    with pytest.raises(ConfigError, match="sparsity_level") as info:
        magnitude_mask(torch.arange(4.0), level)
    assert repr(level) in str(info.value)


@pytest.mark.parametrize(
    "level", ["0.5", None, True, False, [0.5], torch.tensor(0.5), 0.5j], ids=repr
)
def test_non_number_sparsity_level_is_a_config_error(level: Any) -> None:
    with pytest.raises(ConfigError, match="sparsity_level must be a number"):
        magnitude_mask(torch.arange(4.0), level)


@given(level=st.floats(allow_nan=True).filter(lambda x: not 0.0 <= x <= 1.0))
def test_any_float_outside_the_unit_interval_is_refused(level: float) -> None:
    with pytest.raises(ConfigError):
        magnitude_mask(torch.ones(3), level)


def test_magnitude_mask_accepts_numpy_floats() -> None:
    mask = magnitude_mask(torch.arange(4.0), np.float64(0.5))
    assert torch.equal(mask, torch.tensor([0.0, 0.0, 1.0, 1.0]))


# ------------------------------------------------------- aggregate and reduce


@given(
    pair=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5).flatmap(
        lambda shape: st.tuples(
            hnp.arrays(np.float64, shape, elements=st.floats(-1e6, 1e6)),
            hnp.arrays(np.float64, shape, elements=st.floats(-1e6, 1e6)),
        )
    )
)
def test_sum_aggregate_adds(pair: tuple[np.ndarray, np.ndarray]) -> None:
    acc, x = (torch.from_numpy(a) for a in pair)
    acc_before, x_before = acc.clone(), x.clone()
    out = sum_aggregate(acc, x)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out.numpy(), pair[0] + pair[1])
    assert torch.equal(sum_aggregate(torch.zeros_like(x), x), x)
    # the inputs are not modified in place
    assert torch.equal(acc, acc_before)
    assert torch.equal(x, x_before)


def test_sum_aggregate_accumulates_batches() -> None:
    batches = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    acc = torch.zeros(4, 3, dtype=torch.float64)
    for batch in batches:
        acc = sum_aggregate(acc, batch.double())
    torch.testing.assert_close(acc, torch.stack(batches).double().sum(dim=0))


@given(
    array=hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5),
        elements=st.floats(-1e3, 1e3, width=32),
    )
)
def test_mean_over_batch(array: np.ndarray) -> None:
    data = torch.from_numpy(array)
    out = mean_over_batch(data)
    assert out.shape == data.shape[1:]
    assert out.dtype == data.dtype
    expected = array.astype(np.float64).sum(axis=0) / array.shape[0]
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-3)


@given(row=hnp.arrays(np.float64, st.integers(1, 6), elements=st.integers(-100, 100)))
def test_mean_of_identical_rows_is_the_row(row: np.ndarray) -> None:
    data = torch.from_numpy(np.stack([row] * 4))
    assert torch.equal(mean_over_batch(data), torch.from_numpy(row))


# ------------------------------------------------------------- registration


def test_builtins_are_registered_by_name() -> None:
    registry = get_registry()
    version = importlib.metadata.version("actsparse-masks")

    agg = registry.get("aggregate", "sum")
    assert isinstance(agg, AggregateStrategy)
    assert agg.fn is sum_aggregate
    assert agg.elementwise is True

    red = registry.get("reduce", "mean")
    assert isinstance(red, ReduceStrategy)
    assert red.fn is mean_over_batch

    mag = registry.get("mask", "magnitude")
    assert isinstance(mag, MaskStrategy)
    assert mag.fn is magnitude_mask
    assert mag.params == frozenset({"sparsity_level"})
    assert mag.required == frozenset({"sparsity_level"})

    for kind, name in (("aggregate", "sum"), ("reduce", "mean"), ("mask", "magnitude")):
        entry = registry.entry(kind, name)
        assert entry.plugin == "actsparse.masks"
        assert (entry.distribution, entry.version) == ("actsparse-masks", version)
        assert entry.record.description


def test_builtin_functions_resolve_to_their_records() -> None:
    registry = get_registry()
    assert registry.resolve("aggregate", sum_aggregate) is registry.get("aggregate", "sum")
    assert registry.resolve("reduce", mean_over_batch) is registry.get("reduce", "mean")
    assert registry.resolve("mask", magnitude_mask) is registry.get("mask", "magnitude")


def test_magnitude_strategy_checks_its_config() -> None:
    mag = get_registry().get("mask", "magnitude")
    mag.check_config({"sparsity_level": 0.5}, layer="fc")
    with pytest.raises(ConfigError, match="missing key"):
        mag.check_config({}, layer="fc")
    with pytest.raises(ConfigError, match="unknown key"):
        mag.check_config({"sparsity_level": 0.5, "level": 0.5}, layer="fc")
    assert torch.equal(
        mag(torch.arange(4.0), sparsity_level=0.5), magnitude_mask(torch.arange(4.0), 0.5)
    )
