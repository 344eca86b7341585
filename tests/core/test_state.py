"""The state dict's layout and its one validator, ``actsparse.core.parse_state_dict``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from actsparse.core import (
    CONFIG_KEYS,
    FORMAT_VERSION_KEY,
    HOOK_STATES,
    SPARSIFY,
    STATE_FORMAT_VERSION,
    STATE_KEYS,
    LayerState,
    SerializationError,
    StateDict,
    ThresholdResult,
    convert_masks,
    parse_state_dict,
)


def _config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {key: None for key in CONFIG_KEYS}
    config["sparse_config"] = {"sparsity_level": 0.5}
    config.update(overrides)
    return config


def _state_dict() -> dict[str, Any]:
    masks = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])]
    return StateDict(
        defaults=_config(),
        layers={
            "a": LayerState(
                config=_config(mask_fn="magnitude", features=[0, [1, 2]], feature_dim=1),
                hook_state=SPARSIFY,
                mask=masks,
            ),
            "b": LayerState(
                config=_config(mask_fn="target_threshold"),
                hook_state="aggregate",
                threshold=ThresholdResult(0.25, 0.5, 0.5, 0.0),
                data=torch.arange(4.0),
            ),
        },
    ).as_dict()


def test_the_layout_keeps_torch_aos_keys_and_adds_a_version() -> None:
    sd = _state_dict()
    assert list(sd) == [*STATE_KEYS, FORMAT_VERSION_KEY]
    assert sd[FORMAT_VERSION_KEY] == STATE_FORMAT_VERSION
    assert all(m.is_sparse for m in sd["state"]["a"]["mask"])
    assert sd["state"]["b"] == {
        "mask": None,
        "threshold": ThresholdResult(0.25, 0.5, 0.5, 0.0).to_dict(),
    }
    assert set(sd["data_groups"]["b"]) == {*CONFIG_KEYS, "hook_state", "data"}
    assert "data" not in sd["data_groups"]["a"]
    assert "sparsify" in HOOK_STATES


def test_parse_round_trips_and_makes_masks_dense() -> None:
    sd = _state_dict()
    parsed = parse_state_dict(sd)
    assert [m.layout for m in parsed.layers["a"].mask] == [torch.strided, torch.strided]
    assert torch.equal(parsed.layers["a"].mask[1], torch.tensor([0.0, 1.0, 1.0]))
    assert parsed.layers["b"].threshold == ThresholdResult(0.25, 0.5, 0.5, 0.0)
    again = parsed.as_dict(sparse=True)
    assert again.keys() == sd.keys()
    assert torch.equal(parse_state_dict(again).layers["b"].data, torch.arange(4.0))


def test_parse_copies_what_it_returns() -> None:
    sd = _state_dict()
    parsed = parse_state_dict(sd)
    sd["data_groups"]["b"]["sparse_config"]["sparsity_level"] = 0.9
    sd["data_groups"]["b"]["data"].add_(1)
    assert parsed.layers["b"].config["sparse_config"]["sparsity_level"] == 0.5
    assert torch.equal(parsed.layers["b"].data, torch.arange(4.0))


def test_a_state_without_a_version_stays_without_one() -> None:
    sd = _state_dict()
    del sd[FORMAT_VERSION_KEY]
    parsed = parse_state_dict(sd)
    assert parsed.format_version is None
    assert FORMAT_VERSION_KEY not in parsed.as_dict()


def _set(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    sd = copy.deepcopy(_state_dict())
    target = sd
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return sd


def _out_of_range_mask() -> torch.Tensor:
    indices = torch.tensor([[0, 9]])
    return torch.sparse_coo_tensor(indices, torch.ones(2), (3,), check_invariants=False)


@pytest.mark.parametrize(
    ("sd", "message"),
    [
        ([], "must be a mapping"),
        ({"state": {}}, "lacks the key"),
        (_set((FORMAT_VERSION_KEY,), 2), "unknown state format_version 2"),
        (_set((FORMAT_VERSION_KEY,), True), "unknown state format_version True"),
        (_set(("state", 7), {"mask": None}), r"layer names \(strings\).*7"),
        (_set(("data_groups", 7), {}), r"layer names \(strings\).*7"),
        (_set(("defaults", "extra"), 1), "exactly the keys"),
        (_set(("data_groups", "a", "hook_state"), "on"), "hook_state"),
        (_set(("data_groups", "a", "mask_fn"), 3), "strategy name"),
        (_set(("data_groups", "a", "sparse_config"), [1]), "sparse_config"),
        (_set(("state", "a", "mask"), torch.ones(2)), "one tensor per feature"),
        (_set(("state", "a", "mask"), [torch.ones(2)]), "one tensor per feature"),
        (_set(("state", "a", "mask"), "mask"), "None, a tensor or a list"),
        (_set(("state", "a", "mask"), [_out_of_range_mask(), torch.ones(3)]), "sparse"),
        (_set(("state", "b", "threshold"), {"threshold": 1.0}), "exactly the keys"),
        (
            _set(("state", "b", "threshold", "threshold"), float("nan")),
            "threshold.*finite",
        ),
        (_set(("state", "b", "mask"), torch.ones(1)), "both a mask and a threshold"),
        (_set(("state", "ghost"), {"mask": None}), "without a data group: ghost"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_states_are_refused_naming_the_key(sd: Any, message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        parse_state_dict(sd)


def test_files_hold_names_never_callables() -> None:
    sd = _set(("data_groups", "a", "mask_fn"), lambda t: t)
    parse_state_dict(sd)  # in memory, torch.ao-style callables are fine
    with pytest.raises(SerializationError, match="strategy name or None, got function"):
        parse_state_dict(sd, names_only=True)


def test_convert_masks_checks_sparse_indices_before_densifying() -> None:
    sd = {"state": {"a": {"mask": _out_of_range_mask()}}, "data_groups": {}, "defaults": {}}
    with pytest.raises(
        SerializationError, match=r"state\[.a.\]\[.mask.\]: sparse COO indices out of range"
    ):
        convert_masks(sd, sparse=False)
    dense = convert_masks(
        {"state": {"a": {"mask": torch.ones(2).to_sparse()}}, "data_groups": {}, "defaults": {}},
        sparse=False,
    )
    assert torch.equal(dense["state"]["a"]["mask"], torch.ones(2))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("state", "b", "threshold", "threshold"), 1e39, r"state\['b'\]\['threshold'\].*float32"),
        (
            ("state", "b", "offset"),
            torch.tensor([0.5, -1e39], dtype=torch.float64),
            r"state\['b'\]\['offset'\].*float32",
        ),
    ],
    ids=["threshold", "offset"],
)
def test_numbers_beyond_float32_are_refused_naming_the_layer(
    path: tuple[str, ...], value: object, message: str
) -> None:
    # a float32 layer cannot apply them: every forward pass would fail (or the offset
    # would turn into inf), so the state is refused when it is read
    with pytest.raises(SerializationError, match=message):
        parse_state_dict(_set(path, value))
    largest = float(torch.finfo(torch.float32).max)
    parsed = parse_state_dict(_set(("state", "b", "threshold", "threshold"), largest))
    assert parsed.layers["b"].threshold is not None
    assert parsed.layers["b"].threshold.threshold == largest
