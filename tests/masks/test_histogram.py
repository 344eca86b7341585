"""The abs_histogram aggregate and the target_threshold strategy, called directly."""

from __future__ import annotations

import pytest
import torch

from actsparse.core import ConfigError, ThresholdResult, get_registry
from actsparse.masks import (
    abs_histogram_aggregate,
    finalize_histogram,
    init_histogram,
    target_threshold,
)


def test_bins_follow_the_float_bits() -> None:
    x = torch.tensor([0.0, 2.0**-30, 1.0, 1.01, 1.5, -1.5, 2.0**20, float("inf")])
    acc = abs_histogram_aggregate(init_histogram(x, 4, (-2, 2)), x, None, 4, (-2, 2))
    assert acc.shape == (4 * 4 + 3,)
    # below 2**-2: zero and 2**-30; [1, 1.19): 1.0 and 1.01; [1.5, 1.68): +-1.5;
    # 2**20 clamps into the top bin; inf is counted apart, before the invalid positions
    assert acc.tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 0, 0, 0, 0, 1, 1, 0]
    hist = finalize_histogram(acc, 4, (-2, 2))
    edges = hist[0]
    assert edges[0] == 0.25
    assert edges[-1] == 4.0
    assert bool((edges[1:] > edges[:-1]).all())
    assert torch.allclose(edges[1:] / edges[:-1], edges[1:2] / edges[0:1], rtol=0.2)


def test_invalid_positions_go_to_the_last_bin() -> None:
    x = torch.ones(2, 3, 4)
    valid = torch.tensor([[True, True, False], [True, False, False]])[..., None]
    acc = abs_histogram_aggregate(init_histogram(x), x, valid)
    assert int(acc[-1]) == 3 * 4
    assert int(acc[:-1].sum()) == 3 * 4
    assert finalize_histogram(acc)[1].sum() == 12


def test_target_threshold_interpolates_and_reports_unreachable_targets() -> None:
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    hist = finalize_histogram(abs_histogram_aggregate(init_histogram(x), x))
    for level in (0.1, 0.5, 0.9):
        t, expected, zeros = target_threshold(hist, level)
        assert t == pytest.approx(level, abs=0.005)
        assert (expected, zeros) == (level, 0.0)
    half_zero = torch.cat([torch.zeros(100), torch.ones(100)])
    hist = finalize_histogram(abs_histogram_aggregate(init_histogram(half_zero), half_zero))
    assert target_threshold(hist, 0.3) == (0.0, 0.5, 0.5)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


CALIBRATIONS = {
    "constant": lambda: torch.full((4000,), 0.7),
    "two values": lambda: torch.tensor([0.5, 0.7]).repeat(2000),
    "around 1e6": lambda: 1e6 * (1 + 0.1 * torch.randn(4000, generator=_generator())),
    "spread to 1e6": lambda: 1e6 * torch.randn(4000, generator=_generator()),
    "huge": lambda: 1e30 * torch.rand(4000, generator=_generator()),
    "normal": lambda: torch.randn(4000, generator=_generator()),
    "few values": lambda: torch.randn(50, generator=_generator()),
    # ones sit on a bin edge: a threshold that rounds up to it would zero them all
    "ones in bfloat16": lambda: torch.ones(4000, dtype=torch.bfloat16),
    "ones in float16": lambda: torch.ones(4000, dtype=torch.float16),
    "two values in bfloat16": lambda: torch.tensor([0.5, 1.0], dtype=torch.bfloat16).repeat(2000),
}


@pytest.mark.parametrize("name", sorted(CALIBRATIONS))
@pytest.mark.parametrize("level", [0.1, 0.5, 0.9])
def test_the_expected_sparsity_is_what_the_threshold_zeroes(name: str, level: float) -> None:
    x = CALIBRATIONS[name]()
    threshold, expected, zeros = target_threshold(
        finalize_histogram(abs_histogram_aggregate(init_histogram(x), x)), level
    )
    zeroed = float((torch.nn.functional.hardshrink(x, threshold) == 0).double().mean())
    assert abs(expected - zeroed) <= 0.01, (threshold, expected, zeroed)
    result = ThresholdResult(threshold, level, expected, zeros)
    # a target that ties put out of reach is reported as such, not as reached
    assert result.reachable == (abs(zeroed - level) <= 0.01), (expected, zeroed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bins_per_octave": 3}, "bins_per_octave must be a power of two"),
        ({"log2_range": (4, 2)}, "log2_range must be two ints"),
        ({"log2_range": (-200, 2)}, "log2_range must be two ints"),
    ],
)
def test_layout_options_are_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        init_histogram(torch.ones(2), **kwargs)  # type: ignore[arg-type]


def test_target_threshold_checks_its_input() -> None:
    with pytest.raises(ConfigError, match="sparsity_level must be a number in"):
        target_threshold(torch.ones(2, 3), 1.5)
    with pytest.raises(ConfigError, match="counted no valid position"):
        target_threshold(torch.zeros(2, 3), 0.5)


def test_registered_as_dynamic() -> None:
    registry = get_registry()
    assert registry.get("mask", "target_threshold").dynamic
    assert not registry.get("mask", "magnitude").dynamic
    assert registry.get("aggregate", "abs_histogram").params == {
        "bins_per_octave",
        "log2_range",
        "feature_sums",
    }
    assert registry.get("mask", "weighted_threshold").dynamic
