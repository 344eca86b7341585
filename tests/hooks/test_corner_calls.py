"""Corner calls that once gave silent wrong output, lost state or bare errors."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from _support import assert_unchanged, snapshot
from torch import nn

from actsparse.core import (
    ActsparseError,
    ConfigError,
    MaskError,
    SerializationError,
)
from actsparse.hooks import ActivationSparsifier


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


def _sparsifier(model: nn.Module, **kwargs: Any) -> ActivationSparsifier:
    return ActivationSparsifier(model, "sum", "mean", "magnitude", sparsity_level=0.5, **kwargs)


@pytest.mark.parametrize(
    "register",
    [
        lambda s, m: s.register_layer(m[2]),
        lambda s, m: s.register_layer(m[2], features=[0, 2], feature_dim=1),
        lambda s, m: s.register_layer(m[2], reduce_fn="identity"),
    ],
    ids=["plain", "features", "identity-reduce"],
)
def test_a_placeholder_mask_never_changes_the_output_shape(register: Any) -> None:
    model = _model()
    s = _sparsifier(model)
    register(s, model)
    with torch.no_grad():
        model(torch.randn(4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.squash_mask()  # no step(): the torch.ao-compatible placeholder of ones
    with torch.no_grad():
        assert model(torch.randn(4, 6)).shape == (4, 3)
        for batch in (1, 6, 1):  # every call, cached or not
            with pytest.raises(MaskError, match=r"layer '2'.*\(4, 6\).*\(" + str(batch) + ", 6\\)"):
                model(torch.randn(batch, 6))


@pytest.mark.parametrize("index", [2**63, 2**64, -(2**63) - 1])
def test_a_huge_feature_index_is_refused_and_changes_nothing(index: int) -> None:
    model = _model()
    s = _sparsifier(model)
    s.register_layer(model[2])
    with torch.no_grad():
        model(torch.randn(2, 6))
    before = snapshot(model, s)
    with pytest.raises(ConfigError, match="features\\[0\\]"):
        s.register_layer(model[2], features=[index], feature_dim=1)
    with pytest.raises(ConfigError, match="features\\[0\\]"):
        s.register_layers({nn.Linear: {"features": [index], "feature_dim": 1}})
    sd = s.state_dict()
    sd["data_groups"]["2"]["features"] = [index]
    sd["data_groups"]["2"]["feature_dim"] = 1
    sd["state"]["2"]["mask"] = None
    with pytest.raises(ActsparseError):
        s.load_state_dict(sd)
    assert_unchanged(before, snapshot(model, s))


@pytest.mark.parametrize("key", [7, None, ("a",)])
def test_a_layer_key_that_is_not_a_string_is_a_serialization_error(key: Any) -> None:
    model = _model()
    s = _sparsifier(model)
    s.register_layer(model[2])
    sd = s.state_dict()
    sd["state"][key] = sd["state"].pop("2")
    with pytest.raises(SerializationError, match="layer names"):
        s.load_state_dict(sd)
    mixed = s.state_dict()
    mixed["data_groups"][key] = mixed["data_groups"]["2"]
    with pytest.raises(SerializationError, match="layer names"):
        s.load_state_dict(mixed)


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize("mask_fn", ["magnitude", "target_threshold"])
def test_keyword_and_tuple_inputs_are_clear_errors(squash: bool, mask_fn: str) -> None:
    model = _model()
    aggregate = "sum" if mask_fn == "magnitude" else "abs_histogram"
    reduce = "mean" if mask_fn == "magnitude" else "identity"
    s = ActivationSparsifier(model, aggregate, reduce, mask_fn, sparsity_level=0.5)
    s.register_layer(model[0])
    x = torch.randn(2, 6)
    if squash:
        model(x)
        s.step()
        s.squash_mask()
    with pytest.raises(ConfigError, match=r"layer '0' was called without a positional input"):
        model[0](input=x)
    with pytest.raises(ConfigError, match=r"layer '0': its first positional input is a tuple"):
        model[0]((x,))


@pytest.mark.parametrize(
    "make",
    [
        lambda t: torch.quantize_per_tensor(t, 1.0, 0, torch.quint8),
        lambda t: torch.nested.nested_tensor([t, t]),
        lambda t: t.to(torch.complex64),
    ],
    ids=["quint8", "nested", "complex"],
)
def test_step_refuses_masks_that_are_not_plain_real_tensors(make: Any) -> None:
    model = _model()
    s = ActivationSparsifier(model, "sum", "mean", lambda t: make(torch.ones_like(t)))
    s.register_layer(model[2])
    with torch.no_grad():
        model(torch.randn(2, 6))
    before = snapshot(model, s)
    with pytest.raises(MaskError, match="layer '2'"):
        s.step()
    assert_unchanged(before, snapshot(model, s))
