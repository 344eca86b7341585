"""Misuse of load_state_dict(): state dicts edited to be wrong, or of another model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _misuse_table import (
    Misuse,
    Net,
    Scenario,
    calibrated,
    check_misuse,
    misuse_table,
    sample,
    squashed,
    stepped,
)
from _support import assert_unchanged, snapshot

from actsparse.core import (
    LayerNotFoundError,
    MaskError,
    SerializationError,
    StrategyError,
    UnknownStrategyError,
)
from actsparse.hooks import ActivationSparsifier


def _state_dict(edit: Callable[[dict[str, Any]], object], phase: str = "calibrated") -> Scenario:
    """A state dict of one phase, edited, loaded into a calibrated sparsifier."""
    source = {"calibrated": calibrated, "stepped": stepped, "squashed": squashed}[phase]
    _, donor = source(features=[0, [2, 3]], feature_dim=1)
    sd = donor.state_dict()
    edit(sd)
    model, s = calibrated()
    return model, s, lambda: s.load_state_dict(sd)


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def _dense_mask(sd: dict[str, Any], name: str, feature: int) -> torch.Tensor:
    mask: torch.Tensor = sd["state"][name]["mask"][feature]
    return mask.to_dense() if mask.is_sparse else mask


def _replace_mask(
    name: str, feature: int, change: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        sd["state"][name]["mask"][feature] = change(_dense_mask(sd, name, feature))

    return edit


def _rename_layer(sd: dict[str, Any]) -> None:
    sd["data_groups"]["ghost"] = sd["data_groups"].pop("first")
    sd["state"]["ghost"] = sd["state"].pop("first")


def _extra_state(sd: dict[str, Any]) -> None:
    sd["state"]["ghost"] = {"mask": None}


CASES: dict[str, Misuse] = {
    "load: a layer the model lacks": Misuse(
        lambda: _state_dict(_rename_layer),
        LayerNotFoundError,
        AssertionError,
        "layer 'ghost' of the state dict is not in the model",
    ),
    "load: state of a layer without data group": Misuse(
        lambda: _state_dict(_extra_state),
        SerializationError,
        ValueError,
        "names layers without a data group: ghost",
    ),
    "load: data group without a key": Misuse(
        lambda: _state_dict(_delete(("data_groups", "first", "feature_dim"))),
        SerializationError,
        ValueError,
        r"data_groups\['first'\] lacks the key\(s\) 'feature_dim'",
    ),
    "load: unknown hook_state": Misuse(
        lambda: _state_dict(_set(("data_groups", "first", "hook_state"), "frozen")),
        SerializationError,
        ValueError,
        "hook_state",
    ),
    "load: missing state keys": Misuse(
        lambda: _state_dict(_delete(("defaults",))),
        SerializationError,
        ValueError,
        "lacks the key",
    ),
    "load: wrong format version": Misuse(
        lambda: _state_dict(_set(("format_version",), 99)),
        SerializationError,
        ValueError,
        "unknown state format_version 99",
    ),
    "load: one mask per feature expected": Misuse(
        lambda: _state_dict(_set(("state", "first", "mask"), [torch.ones(4, 1)])),
        SerializationError,
        ValueError,
        "must be a list with one tensor per feature",
    ),
    "load: data per feature expected": Misuse(
        lambda: _state_dict(_set(("data_groups", "first", "data"), torch.ones(4, 3))),
        SerializationError,
        ValueError,
        "the data of layer 'first' cannot be restored",
    ),
    "load: mask not 0/1": Misuse(
        lambda: _state_dict(_replace_mask("first", 1, lambda m: m * 2), "stepped"),
        MaskError,
        ValueError,
        r"layer 'first', features\[1\]: the state dict holds values other than 0 and 1",
    ),
    "load: mask does not fit the data": Misuse(
        lambda: _state_dict(_replace_mask("first", 0, lambda m: torch.ones(4, 3))),
        MaskError,
        ValueError,
        r"layer 'first', features\[0\]: the state dict holds a mask of shape \(4, 3\)",
    ),
    "load: mask on the meta device": Misuse(
        lambda: _state_dict(_replace_mask("first", 0, lambda m: m.to("meta")), "squashed"),
        MaskError,
        ValueError,
        "meta device",
    ),
    "load: squashed layer without mask": Misuse(
        lambda: _state_dict(_set(("state", "first", "mask"), None), "squashed"),
        SerializationError,
        ValueError,
        "is squashed but its state holds no mask",
    ),
    "load: unknown strategy name": Misuse(
        lambda: _state_dict(_set(("data_groups", "second", "mask_fn"), "topk_nope")),
        UnknownStrategyError,
        ValueError,
        "unknown mask strategy 'topk_nope'",
    ),
}


@misuse_table(CASES)
def test_misuse_raises_and_changes_nothing(case: Misuse) -> None:
    check_misuse(case)


@pytest.mark.parametrize("phase", ["calibrated", "squashed"])
def test_a_state_dict_of_another_width_fails_on_the_first_forward_pass(phase: str) -> None:
    source = {"calibrated": calibrated, "squashed": squashed}[phase]
    _, donor = source()
    wide = Net(width=8)
    s = ActivationSparsifier(wide)
    s.load_state_dict(donor.state_dict())  # nothing in the state dict says the width
    before = snapshot(wide, s)
    error = StrategyError if phase == "calibrated" else MaskError
    with pytest.raises(error, match="layer 'first'") as info:
        wide(sample(width=8))
    assert isinstance(info.value, RuntimeError if phase == "calibrated" else ValueError)
    assert_unchanged(before, snapshot(wide, s))
    s.unregister_layer("first")
    assert wide(sample(width=8)).shape == (4, 3)
