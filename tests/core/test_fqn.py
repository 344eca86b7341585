"""module_to_fqn / fqn_to_module agree with torch.ao.pruning.sparsifier.utils (differential)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.pruning.sparsifier import utils as ao

from actsparse.core import fqn_to_module, module_to_fqn

CHILD_NAMES = ["a", "b", "body", "head", "0", "1", "layer_2"]


@st.composite
def models(draw: st.DrawFn, depth: int = 0) -> nn.Module:
    """A random tree of containers and leaves, sometimes sharing a module between branches."""
    if depth >= 3 or (depth > 0 and draw(st.booleans())):
        return draw(
            st.sampled_from(
                [
                    lambda: nn.Linear(2, 2),
                    lambda: nn.ReLU(),
                    lambda: nn.Conv2d(1, 1, 1),
                    lambda: nn.Identity(),
                ]
            )
        )()
    container = nn.Module()
    names = draw(st.lists(st.sampled_from(CHILD_NAMES), min_size=1, max_size=3, unique=True))
    children = [draw(models(depth + 1)) for _ in names]
    for name, child in zip(names, children, strict=True):
        if children and draw(st.integers(0, 5)) == 0:
            child = draw(st.sampled_from(children))  # shared: reachable by two paths
        container.add_module(name, child)
    if draw(st.integers(0, 6)) == 0:
        container.add_module("empty", None)
    return container


def _paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules(remove_duplicate=False)]


@settings(max_examples=60, deadline=None)
@given(model=models(), data=st.data())
def test_module_to_fqn_agrees_with_torch_ao(model: nn.Module, data: st.DataObject) -> None:
    for _, module in model.named_modules():
        assert module_to_fqn(model, module) == ao.module_to_fqn(model, module)
    assert module_to_fqn(model, model) == "" == ao.module_to_fqn(model, model)
    foreign = nn.Linear(2, 2)
    assert module_to_fqn(model, foreign) is None
    assert ao.module_to_fqn(model, foreign) is None
    prefix = data.draw(st.sampled_from(["", "outer.", "x"]))
    module = data.draw(st.sampled_from([m for _, m in model.named_modules()]))
    assert module_to_fqn(model, module, prefix) == ao.module_to_fqn(model, module, prefix)


@settings(max_examples=60, deadline=None)
@given(model=models(), data=st.data())
def test_fqn_to_module_agrees_with_torch_ao(model: nn.Module, data: st.DataObject) -> None:
    real = _paths(model)
    for path in real:
        found = fqn_to_module(model, path)
        assert found is ao.fqn_to_module(model, path)
        assert isinstance(found, nn.Module)
        assert module_to_fqn(model, found) is not None
    # made-up and partly-real paths, tensor attributes included
    parts = st.sampled_from([*CHILD_NAMES, "weight", "bias", "missing", "empty", ""])
    for _ in range(10):
        path = ".".join(data.draw(st.lists(parts, min_size=1, max_size=4)))
        ours = fqn_to_module(model, path)
        assert ours is ao.fqn_to_module(model, path), path


@settings(max_examples=40, deadline=None)
@given(model=models())
def test_round_trip(model: nn.Module) -> None:
    for _, module in model.named_modules():
        fqn = module_to_fqn(model, module)
        assert fqn is not None
        assert fqn_to_module(model, fqn) is module


def test_nested_sequential_example() -> None:
    inner = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Sequential(inner, nn.Linear(3, 1)))
    expected = {model[0]: "0", inner: "1.0", inner[0]: "1.0.0", inner[1]: "1.0.1"}
    for module, fqn in expected.items():
        assert module_to_fqn(model, module) == fqn == ao.module_to_fqn(model, module)
        assert fqn_to_module(model, fqn) is module
    assert fqn_to_module(model, "1.0.0.weight") is inner[0].weight
    assert isinstance(fqn_to_module(model, "1.0.0.weight"), torch.Tensor)


def test_shared_module_gets_its_first_path() -> None:
    shared = nn.Linear(2, 2)
    model = nn.Module()
    model.add_module("first", nn.Sequential(nn.ReLU(), shared))
    model.add_module("second", shared)
    assert module_to_fqn(model, shared) == "first.1" == ao.module_to_fqn(model, shared)


@pytest.mark.parametrize("path", ["", "0"])
def test_none_model(path: str) -> None:
    assert fqn_to_module(None, path) is None
    assert ao.fqn_to_module(None, path) is None


def test_empty_path_is_the_model() -> None:
    model = nn.Linear(1, 1)
    assert fqn_to_module(model, "") is model
