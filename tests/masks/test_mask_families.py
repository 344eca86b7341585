"""Each built-in mask keeps its promise; each reduce does what its name says."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.core import ConfigError, get_registry

SHAPES = st.lists(st.integers(1, 7), min_size=1, max_size=4)


def _mask(name: str, data: torch.Tensor, **config: object) -> torch.Tensor:
    return get_registry().get("mask", name).fn(data, **config)  # type: ignore[no-any-return]


def _binary(mask: torch.Tensor, data: torch.Tensor) -> None:
    assert mask.shape == data.shape
    assert mask.dtype == data.dtype
    assert bool(((mask == 0) | (mask == 1)).all())


def _distinct(shape: list[int], seed: int) -> torch.Tensor:
    """Data with distinct absolute values, so the ranking is unambiguous."""
    n = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.randperm(n, generator=generator).double() + 1
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return (magnitudes * signs).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, level=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_magnitude_sparsity_is_within_one_over_n_and_zeroes_the_smallest(
    shape: list[int], level: float, seed: int
) -> None:
    data = _distinct(shape, seed)
    mask = _mask("magnitude", data, sparsity_level=level)
    _binary(mask, data)
    n = data.numel()
    zeros = int((mask == 0).sum())
    assert abs(zeros / n - level) <= 1 / n
    if 0 < zeros < n:
        assert data.abs()[mask == 0].max() < data.abs()[mask == 1].min()


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, data=st.data(), seed=st.integers(0, 2**16))
def test_topk_keeps_exactly_k_along_dim_and_they_are_the_largest(
    shape: list[int], data: st.DataObject, seed: int
) -> None:
    x = _distinct(shape, seed)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    k = data.draw(st.integers(0, shape[dim]))
    mask = _mask("topk", x, k=k, dim=dim)
    _binary(mask, x)
    assert bool((mask.sum(dim=dim) == k).all())
    kept = torch.where(mask == 1, x.abs(), torch.inf).amin(dim=dim)
    dropped = torch.where(mask == 0, x.abs(), -torch.inf).amax(dim=dim)
    assert bool((dropped < kept).all())


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_topk_fraction_and_the_flattened_ranking(
    shape: list[int], fraction: float, seed: int
) -> None:
    x = _distinct(shape, seed)
    mask = _mask("topk", x, fraction=fraction)
    assert bool((mask.sum(dim=-1) == round(fraction * shape[-1])).all())
    flat = _mask("topk", x, fraction=fraction, dim=None)
    assert int(flat.sum()) == round(fraction * x.numel())
    # Over all entries, topk with k = n - m keeps the complement of magnitude's zeros.
    zeros = round(fraction * x.numel())
    assert torch.equal(
        _mask("topk", x, k=x.numel() - zeros, dim=None),
        _mask("magnitude", x, sparsity_level=zeros / x.numel()),
    )


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, data=st.data(), seed=st.integers(0, 2**16))
def test_n_m_keeps_exactly_n_of_every_m(shape: list[int], data: st.DataObject, seed: int) -> None:
    x = _distinct(shape, seed)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    m = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(0, m))
    mask = _mask("n_m", x, n=n, m=m, dim=dim)
    _binary(mask, x)
    moved, values = mask.movedim(dim, -1), x.abs().movedim(dim, -1)
    size = moved.shape[-1]
    for start in range(0, size, m):
        group, group_values = moved[..., start : start + m], values[..., start : start + m]
        width = group.shape[-1]
        # Full groups keep exactly n; a short last group keeps min(n, its width).
        assert bool((group.sum(dim=-1) == min(n, width)).all())
        if 0 < n < width:
            kept = torch.where(group == 1, group_values, torch.inf).amin(dim=-1)
            dropped = torch.where(group == 0, group_values, -torch.inf).amax(dim=-1)
            assert bool((dropped < kept).all())


def test_two_four_on_a_row() -> None:
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, 9.0, 8.0, -7.0, 1.0]])
    expected = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(_mask("n_m", x, n=2, m=4), expected)


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, threshold=st.floats(0, 5), seed=st.integers(0, 2**16))
def test_threshold_zeroes_exactly_the_entries_at_or_below_it(
    shape: list[int], threshold: float, seed: int
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    x.view(-1)[0] = threshold  # the boundary itself is zeroed
    mask = _mask("threshold", x, threshold=threshold)
    _binary(mask, x)
    assert torch.equal(mask == 0, x.abs() <= threshold)


def test_a_per_feature_statistic_gives_channel_sparsity_that_broadcasts() -> None:
    statistic = torch.tensor([0.5, 0.1, 2.0, 0.3])  # one value per channel
    mask = _mask("magnitude", statistic, sparsity_level=0.5)
    x = torch.randn(6, 9, 4)
    sparse = x * mask
    assert bool((sparse[..., mask == 0] == 0).all())
    assert torch.equal(sparse[..., mask == 1], x[..., mask == 1])


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("magnitude", {"sparsity_level": 1.5}, "sparsity_level"),
        ("threshold", {"threshold": "0.1"}, "threshold"),
        ("threshold", {"threshold": math.nan}, "threshold"),
        ("topk", {}, "exactly one of k and fraction"),
        ("topk", {"k": 2, "fraction": 0.5}, "exactly one of k and fraction"),
        ("topk", {"k": 9}, r"k must be an int in \[0, 4\]"),
        ("topk", {"fraction": 2.0}, "fraction"),
        ("topk", {"k": 1, "dim": 3}, "dim=3"),
        ("n_m", {"n": 3, "m": 2}, "n must be"),
        ("n_m", {"n": 1, "m": 0}, "m must be"),
        ("block_norm", {"sparsity_level": 0.5, "sparse_block_shape": (0, 2)}, "block_shape"),
        ("block_norm", {"sparsity_level": 0.5, "zeros_per_block": 5}, "zeros_per_block"),
        ("block_norm", {"sparsity_level": 0.5, "norm": "L3"}, "norm"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(
    name: str, config: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _mask(name, torch.randn(3, 4), **config)


def test_masks_declare_their_keys() -> None:
    registry = get_registry()
    declared = {
        name: (registry.get("mask", name).params, registry.get("mask", name).required)
        for name in registry.names("mask")
    }
    assert declared["threshold"] == ({"threshold"}, {"threshold"})
    assert declared["topk"] == ({"k", "fraction", "dim"}, frozenset())
    assert declared["n_m"] == ({"n", "m", "dim"}, {"n", "m"})
    assert declared["block_norm"][1] == {"sparsity_level"}
    for name in ("mean", "abs_mean", "sq_mean", "abs_max"):
        assert registry.get("aggregate", name).params == {"sample_dims"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mean", lambda t: t.mean(0)),
        ("identity", lambda t: t),
        ("sum", lambda t: t.sum(0)),
        ("max", lambda t: t.max(0).values),
        ("l2", lambda t: (t * t).sum(0).sqrt()),
    ],
)
def test_reduces(name: str, expected: object) -> None:
    data = torch.randn(5, 3, 2)
    got = get_registry().get("reduce", name).fn(data)
    torch.testing.assert_close(got, expected(data))  # type: ignore[operator]
