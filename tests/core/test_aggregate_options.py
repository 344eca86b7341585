"""AggregateStrategy's options and feature axis, and how sparse_config is routed."""

from __future__ import annotations

import pytest
import torch

from actsparse.core import AggregateStrategy, ConfigError, MaskStrategy, split_sparse_config


def _fold(acc: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return acc + scale * x.sum(0)


def _axis(dim: int, ndim: int, scale: float = 1.0) -> int:
    return dim - 1


def test_required_must_be_declared() -> None:
    with pytest.raises(ConfigError, match=r"AggregateStrategy.required.*'?scale"):
        AggregateStrategy(name="a", fn=_fold, required={"scale"})


def test_elementwise_and_feature_axis_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match=r"elementwise.*feature_axis"):
        AggregateStrategy(name="a", fn=_fold, elementwise=True, feature_axis=_axis)


def test_params_must_be_identifiers() -> None:
    with pytest.raises(ConfigError, match=r"AggregateStrategy\.params"):
        AggregateStrategy(name="a", fn=_fold, params={"not a name"})


def test_bind_applies_options_to_every_callable() -> None:
    strategy = AggregateStrategy(
        name="a",
        fn=_fold,
        init=lambda x, scale=1.0: torch.zeros(x.shape[1:]),
        finalize=lambda acc, scale=1.0: acc / scale,
        feature_axis=_axis,
        params={"scale"},
    )
    bound = strategy.bind({"scale": 2.0})
    x = torch.ones(3, 4)
    assert bound.init is not None
    assert bound.finalize is not None
    acc = bound.fn(bound.init(x), x)
    assert torch.equal(acc, torch.full((4,), 6.0))
    assert torch.equal(bound.finalize(acc), torch.full((4,), 3.0))
    assert bound.feature_axis is not None
    assert bound.feature_axis(1, 2) == 0
    plain = AggregateStrategy(name="b", fn=_fold).bind({})
    assert plain.fn is _fold
    assert plain.init is None
    assert plain.feature_axis is None


def _mask(data: torch.Tensor, level: float) -> torch.Tensor:
    return data


AGG = AggregateStrategy(name="agg", fn=_fold, params={"scale", "shared"}, required={"scale"})


def test_keys_go_to_the_strategy_that_declares_them() -> None:
    mask = MaskStrategy(name="m", fn=_mask, params={"level", "shared"}, required={"level"})
    options, mask_options = split_sparse_config(
        AGG, mask, {"scale": 2, "level": 0.5, "shared": 1}, layer="L"
    )
    assert options == {"scale": 2, "shared": 1}
    assert mask_options == {"level": 0.5, "shared": 1}
    anything = MaskStrategy(name="any", fn=_mask)
    options, mask_options = split_sparse_config(AGG, anything, {"scale": 2, "other": 3}, layer="L")
    assert options == {"scale": 2}
    assert mask_options == {"other": 3}


def test_unknown_and_missing_keys_name_the_layer_strategies_and_accepted_keys() -> None:
    mask = MaskStrategy(name="m", fn=_mask, params={"level"}, required={"level"})
    with pytest.raises(ConfigError) as info:
        split_sparse_config(AGG, mask, {"levle": 0.5}, layer="block.fc")
    message = str(info.value)
    assert message.startswith("layer 'block.fc': ")
    assert "unknown key(s) 'levle'" in message
    assert "missing key(s) 'level', 'scale'" in message
    assert "mask strategy 'm' accepts 'level'" in message
    assert "aggregate strategy 'agg' accepts 'scale', 'shared'" in message


def test_without_aggregate_params_the_mask_check_is_unchanged() -> None:
    mask = MaskStrategy(name="m", fn=_mask, params={"level"}, required={"level"})
    plain = AggregateStrategy(name="plain", fn=_fold)
    assert split_sparse_config(plain, mask, {"level": 1}, layer="L") == ({}, {"level": 1})
    with pytest.raises(ConfigError, match=r"'m' has unknown key\(s\) 'x'; it accepts 'level'"):
        split_sparse_config(plain, mask, {"level": 1, "x": 2}, layer="L")
