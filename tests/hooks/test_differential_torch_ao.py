"""Differential tests: actsparse against torch.ao's own ActivationSparsifier.

Same model weights, same data and same functions must give identical
aggregated data, masks, state dicts and outputs after ``squash_mask``, over
random layer types, feature selections, feature dims and batch shapes.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.hooks import ActivationSparsifier

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
        ActivationSparsifier as TorchAOSparsifier,
    )


def add(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return left + right


def batch_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=0)


def smallest_off(data: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    flat = data.abs().flatten()
    keep = torch.ones_like(flat)
    keep[torch.sort(flat).indices[: round(sparsity_level * flat.numel())]] = 0
    return keep.view(data.shape)


def _layer_and_shape(kind: str, draw: Any) -> tuple[nn.Module, tuple[int, ...]]:
    batch = draw(st.integers(1, 5))
    if kind == "linear":
        width = draw(st.integers(2, 12))
        extra = draw(st.lists(st.integers(1, 4), max_size=1))
        return nn.Linear(width, 3), (batch, *extra, width)
    if kind == "conv2d":
        channels = draw(st.integers(1, 6))
        side = draw(st.integers(3, 7))
        return nn.Conv2d(channels, 2, 3), (batch, channels, side, side)
    if kind == "conv1d":
        channels = draw(st.integers(1, 6))
        return nn.Conv1d(channels, 2, 2), (batch, channels, draw(st.integers(2, 9)))
    dims = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    return nn.Identity(), (batch, *dims)


@st.composite
def configurations(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["linear", "conv2d", "conv1d", "identity"]))
    layer, shape = _layer_and_shape(kind, draw)
    features = feature_dim = None
    if draw(st.booleans()):
        feature_dim = draw(st.integers(1, len(shape) - 1))
        size = shape[feature_dim]
        features = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size, unique=True))
        if draw(st.booleans()):
            feature_dim -= len(shape)  # a negative dim works in both
    return {
        "layer": layer,
        "shape": shape,
        "features": features,
        "feature_dim": feature_dim,
        "sparsity_level": draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.77, 1.0])),
        "batches": draw(st.integers(1, 4)),
        "names": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _dense(mask: Any) -> Any:
    if isinstance(mask, list):
        return [_dense(m) for m in mask]
    return mask.to_dense() if isinstance(mask, torch.Tensor) and mask.is_sparse else mask


def _same(left: Any, right: Any) -> None:
    left, right = _dense(left), _dense(right)
    if isinstance(left, list):
        assert isinstance(right, list)
        assert len(left) == len(right)
        for a, b in zip(left, right, strict=True):
            _same(a, b)
    elif isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor)
        assert left.shape == right.shape
        assert left.dtype == right.dtype
        assert torch.equal(left, right)
    else:
        assert left == right


def _compare_state_dicts(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert set(theirs) <= set(ours)
    assert ours["defaults"] == dict(theirs["defaults"])
    assert ours["state"].keys() == theirs["state"].keys()
    for name in theirs["state"]:
        ours_mask, theirs_mask = ours["state"][name]["mask"], theirs["state"][name]["mask"]
        for m in ours_mask if isinstance(ours_mask, list) else [ours_mask]:
            assert m is None or m.is_sparse
        _same(ours_mask, theirs_mask)
    assert ours["data_groups"].keys() == theirs["data_groups"].keys()
    for name, group in theirs["data_groups"].items():
        assert ours["data_groups"][name].keys() == group.keys()
        for key, value in group.items():
            _same(ours["data_groups"][name][key], value)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(configurations())
def test_matches_torch_ao(config: dict[str, Any]) -> None:
    torch.manual_seed(config["seed"])
    model = nn.Sequential(nn.Identity(), config["layer"])
    twin = copy.deepcopy(model)
    functions = {"aggregate_fn": add, "reduce_fn": batch_mean, "mask_fn": smallest_off}
    named = {"aggregate_fn": "sum", "reduce_fn": "mean", "mask_fn": "magnitude"}
    layer_args = {
        "features": config["features"],
        "feature_dim": config["feature_dim"],
        "sparsity_level": config["sparsity_level"],
    }
    theirs = TorchAOSparsifier(model, **functions)
    theirs.register_layer(model[1], **layer_args)
    ours = ActivationSparsifier(twin, **functions)
    ours.register_layer(twin[1], **(named if config["names"] else {}), **layer_args)

    expected_defaults = dict(theirs.defaults)
    assert ours.defaults == expected_defaults

    with torch.no_grad():
        for _ in range(config["batches"]):
            x = torch.randn(config["shape"])
            model(x.clone())
            twin(x.clone())
    _same(ours.data_groups["1"]["data"], theirs.data_groups["1"]["data"])
    _same(ours.get_mask("1"), theirs.get_mask("1"))
    if not config["names"]:
        _compare_state_dicts(ours.state_dict(), theirs.state_dict())

    theirs.step()
    ours.step()
    _same(ours.get_mask("1"), theirs.get_mask("1"))
    assert "data" not in ours.data_groups["1"]
    if not config["names"]:
        _compare_state_dicts(ours.state_dict(), theirs.state_dict())

    theirs.squash_mask()
    ours.squash_mask()
    if not config["names"]:
        _compare_state_dicts(ours.state_dict(), theirs.state_dict())
    probe = torch.randn(config["shape"])
    with torch.no_grad():
        # torch.ao writes the masked features into its input: give it a copy.
        expected = model(probe.clone())
        actual = twin(probe)
    _same(actual, expected)


def test_torch_ao_state_dict_loads_into_actsparse() -> None:
    """A state dict that torch.ao produced restores into actsparse, and back."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    twin = copy.deepcopy(model)
    functions = {"aggregate_fn": add, "reduce_fn": batch_mean, "mask_fn": smallest_off}
    theirs = TorchAOSparsifier(model, **functions, sparsity_level=0.5)
    theirs.register_layer(model[0])
    theirs.register_layer(model[2], features=[1, 4], feature_dim=1)
    with torch.no_grad():
        model(torch.randn(4, 6))
    theirs.step()
    theirs.squash_mask()

    ours = ActivationSparsifier(twin)
    ours.load_state_dict(theirs.state_dict())
    probe = torch.randn(4, 6)
    with torch.no_grad():
        _same(twin(probe), model(probe.clone()))

    back = TorchAOSparsifier(copy.deepcopy(model))
    back.load_state_dict(ours.state_dict())
    for name in ("0", "2"):
        _same(back.get_mask(name), theirs.get_mask(name))
