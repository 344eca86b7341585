"""Misuse of the sparsifier's API gets a clear error, and a failing call changes nothing.

Each error is an actsparse error that is also the builtin torch.ao raises for
the same misuse, and its message names what is at fault.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _support import assert_unchanged, snapshot
from torch import nn

from actsparse.core import (
    ActsparseError,
    ConfigError,
    LayerNotFoundError,
    MaskNotReadyError,
    StateError,
    UnknownStrategyError,
)
from actsparse.hooks import ActivationSparsifier


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(torch.relu(self.first(x)))
        return out


def _sparsifier() -> tuple[Net, ActivationSparsifier]:
    model = Net()
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    return model, sparsifier


def _expect(
    error: type[BaseException],
    builtin: type[BaseException],
    match: str,
    call: Callable[[], object],
    model: nn.Module,
    sparsifier: ActivationSparsifier,
) -> None:
    before = snapshot(model, sparsifier)
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, ActsparseError)
    assert isinstance(info.value, builtin)
    assert_unchanged(before, snapshot(model, sparsifier))


def test_layer_not_in_model() -> None:
    model, s = _sparsifier()
    _expect(
        LayerNotFoundError,
        AssertionError,
        "not a submodule",
        lambda: s.register_layer(nn.Linear(2, 2)),
        model,
        s,
    )


def test_features_without_feature_dim() -> None:
    model, s = _sparsifier()
    _expect(
        ConfigError,
        AssertionError,
        "needs feature_dim",
        lambda: s.register_layer(model.first, features=[0, 1]),
        model,
        s,
    )


@pytest.mark.parametrize("key", ["aggregate_fn", "reduce_fn", "mask_fn"])
def test_function_not_callable(key: str) -> None:
    model, s = _sparsifier()
    _expect(
        ConfigError,
        AssertionError,
        f"{key} must be callable",
        lambda: s.register_layer(model.first, **{key: 42}),
        model,
        s,
    )


def test_unknown_strategy_name_lists_known_and_package() -> None:
    model, s = _sparsifier()
    _expect(
        UnknownStrategyError,
        ValueError,
        r"unknown mask strategy 'nope'; known: .*'magnitude'.*No installed plugin provides it",
        lambda: s.register_layer(model.first, mask_fn="nope"),
        model,
        s,
    )


def test_missing_function_is_named() -> None:
    model = Net()
    s = ActivationSparsifier(model, aggregate_fn="sum", reduce_fn="mean")
    _expect(
        ConfigError,
        AssertionError,
        "mask_fn is required",
        lambda: s.register_layer(model.first),
        model,
        s,
    )


def test_unknown_sparse_config_key_is_reported_at_registration() -> None:
    model, s = _sparsifier()
    _expect(
        ConfigError,
        ValueError,
        r"layer 'first'.*'magnitude'.*unknown key\(s\) 'sparsity'.*accepts 'sparsity_level'",
        lambda: s.register_layer(model.first, sparsity=0.2),
        model,
        s,
    )


def test_registering_again_warns_and_replaces() -> None:
    model, s = _sparsifier()
    s.register_layer(model.first)
    hooks_before = len(model.first._forward_pre_hooks)
    with pytest.warns(UserWarning, match="already registered"):
        s.register_layer(model.first, sparsity_level=0.9)
    assert len(model.first._forward_pre_hooks) == hooks_before
    assert s.data_groups["first"]["sparse_config"] == {"sparsity_level": 0.9}


def test_registering_again_with_a_bad_config_keeps_the_old_one() -> None:
    model, s = _sparsifier()
    s.register_layer(model.first)
    _expect(
        ConfigError,
        AssertionError,
        "needs feature_dim",
        lambda: s.register_layer(model.first, features=[1]),
        model,
        s,
    )


def test_get_mask_errors() -> None:
    model, s = _sparsifier()
    s.register_layer(model.first)
    _expect(ConfigError, AssertionError, "needs a layer name", lambda: s.get_mask(), model, s)
    _expect(
        LayerNotFoundError,
        ValueError,
        "no layer named 'nope'",
        lambda: s.get_mask("nope"),
        model,
        s,
    )
    _expect(MaskNotReadyError, ValueError, "no mask yet", lambda: s.get_mask("first"), model, s)
    _expect(
        LayerNotFoundError,
        ValueError,
        "not a submodule",
        lambda: s.get_mask(layer=nn.Linear(1, 1)),
        model,
        s,
    )
    model(torch.randn(2, 6))
    assert torch.equal(s.get_mask(layer=model.first), torch.ones(2, 6))


def test_unregister_unknown_layer() -> None:
    model, s = _sparsifier()
    _expect(
        LayerNotFoundError, KeyError, "no layer named", lambda: s.unregister_layer("x"), model, s
    )


def test_step_before_any_input_and_twice() -> None:
    model, s = _sparsifier()
    s.register_layer(model.first)
    _expect(StateError, KeyError, "no aggregated data", s.step, model, s)
    model(torch.randn(3, 6))
    s.step()
    _expect(StateError, KeyError, "no aggregated data", s.step, model, s)


def test_step_keeps_every_mask_when_one_layer_fails() -> None:
    model, s = _sparsifier()
    s.register_layer(model.first)
    s.register_layer(model.second, mask_fn=lambda t, sparsity_level: t * 3)
    model(torch.randn(3, 6))
    _expect(ActsparseError, ValueError, "values other than 0 and 1", s.step, model, s)


def test_squash_before_input_twice_and_step_after() -> None:
    model, s = _sparsifier()
    s.register_layer(model.first)
    _expect(MaskNotReadyError, ValueError, "no mask", s.squash_mask, model, s)
    model(torch.randn(3, 6))
    s.step()
    s.squash_mask()
    _expect(StateError, RuntimeError, "already squashed", s.squash_mask, model, s)
    _expect(StateError, KeyError, "squashed", s.step, model, s)


def test_load_state_dict_with_a_layer_the_model_lacks() -> None:
    model, s = _sparsifier()
    s.register_layer(model.first)
    model(torch.randn(3, 6))
    sd = s.state_dict()
    sd["data_groups"]["ghost"] = dict(sd["data_groups"]["first"])
    other_model, other = _sparsifier()
    other.register_layer(other_model.second)
    _expect(
        LayerNotFoundError,
        AssertionError,
        "'ghost' of the state dict is not in the model",
        lambda: other.load_state_dict(sd),
        other_model,
        other,
    )


def test_load_state_dict_replaces_existing_layers_and_their_hooks() -> None:
    model, s = _sparsifier()
    s.register_layer(model.first)
    model(torch.randn(3, 6))
    sd = s.state_dict()
    other_model, other = _sparsifier()
    other.register_layer(other_model.second)
    other.load_state_dict(sd)
    assert list(other.data_groups) == ["first"]
    assert len(other_model.second._forward_pre_hooks) == 0
    assert len(other_model.first._forward_pre_hooks) == 1
