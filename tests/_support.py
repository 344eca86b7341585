"""Helpers shared by the test folders (``tests/`` is on ``sys.path`` for pytest)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from actsparse.hooks import ActivationSparsifier


class Recorder(TorchDispatchMode):
    """Records the name of every aten operator that runs inside ``with Recorder():``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def same_state(left: Any, right: Any) -> bool:
    """Whether two masks, accumulators or state dicts are exactly equal.

    Tensors must agree in dtype, shape and every value; lists and tuples in
    type, length and items; dicts in keys and values; anything else by ``==``.
    """
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        return (
            isinstance(left, torch.Tensor)
            and isinstance(right, torch.Tensor)
            and left.dtype == right.dtype
            and left.shape == right.shape
            and bool(torch.equal(left, right))
        )
    if isinstance(left, (list, tuple)):
        return (
            type(left) is type(right)
            and len(left) == len(right)
            and all(same_state(a, b) for a, b in zip(left, right, strict=True))
        )
    if isinstance(left, dict):
        return (
            isinstance(right, dict)
            and left.keys() == right.keys()
            and all(same_state(v, right[k]) for k, v in left.items())
        )
    return bool(left == right)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def snapshot(model: nn.Module, sparsifier: ActivationSparsifier) -> dict[str, Any]:
    """Everything a failing call must leave alone: hooks, groups, data, masks, weights."""
    hooks = {
        name: (
            [(key, fn) for key, fn in module._forward_pre_hooks.items()],
            [(key, fn) for key, fn in module._forward_hooks.items()],
        )
        for name, module in model.named_modules()
    }
    groups = {
        name: {key: value for key, value in group.items() if key != "data"}
        for name, group in sparsifier.data_groups.items()
    }
    return {
        "hooks": hooks,
        "groups": groups,
        "data": {name: _clone(g.get("data")) for name, g in sparsifier.data_groups.items()},
        "masks": {name: _clone(s["mask"]) for name, s in sparsifier.state.items()},
        "defaults": sparsifier.defaults,
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "thresholds": dict(sparsifier.thresholds),
    }


def _same_value(left: Any, right: Any, where: str) -> None:
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        assert isinstance(left, torch.Tensor), where
        assert isinstance(right, torch.Tensor), where
        torch.testing.assert_close(left, right, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(left, list) or isinstance(right, list):
        assert isinstance(left, list), where
        assert isinstance(right, list), where
        assert len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            _same_value(a, b, f"{where}[{i}]")
    else:
        assert left == right, where


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["hooks"] == after["hooks"], "the model's hooks changed"
    assert before["defaults"] == after["defaults"], "the defaults changed"
    assert before["thresholds"] == after["thresholds"], "the thresholds changed"
    assert before["groups"].keys() == after["groups"].keys(), "the registered layers changed"
    for name, group in before["groups"].items():
        other = after["groups"][name]
        assert group.keys() == other.keys(), name
        for key, value in group.items():
            if key in ("layer", "hook"):
                assert value is other[key], f"{name}.{key}"
            else:
                assert value == other[key], f"{name}.{key}"
    for part in ("data", "masks", "weights"):
        assert before[part].keys() == after[part].keys(), part
        for name in before[part]:
            _same_value(before[part][name], after[part][name], f"{part}[{name!r}]")
