"""A table of misuse: each failing call raises the documented error and changes nothing.

Every row builds a sparsifier at some point of the workflow, takes a snapshot of
the model's hooks, the data groups, the aggregated data, the masks, the
defaults and the model's weights, makes one bad call, and checks that the error
is an actsparse error that is also the builtin torch.ao raised, that the
message names what is at fault, and that the snapshot is unchanged.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _support import assert_unchanged, snapshot
from torch import nn

from actsparse.core import (
    ENTRY_POINT_GROUP,
    KINDS,
    ActsparseError,
    AggregateStrategy,
    ConfigError,
    DuplicateStrategyError,
    LayerNotFoundError,
    MaskError,
    MaskNotReadyError,
    MaskStrategy,
    PluginError,
    PluginWarning,
    ReduceStrategy,
    Registry,
    SerializationError,
    StateError,
    StrategyError,
    UnknownStrategyError,
    get_plugin_manager,
    get_registry,
    hookimpl,
    make_plugin_manager,
    register_plugin,
)
from actsparse.hooks import ActivationSparsifier


class Net(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.first = nn.Linear(width, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(torch.relu(self.first(x)))
        return out


def make(**defaults: Any) -> tuple[Net, ActivationSparsifier]:
    model = Net()
    config: dict[str, Any] = {
        "aggregate_fn": "sum",
        "reduce_fn": "mean",
        "mask_fn": "magnitude",
        "sparsity_level": 0.5,
    }
    config.update(defaults)
    return model, ActivationSparsifier(model, **config)


# --------------------------------------------------------------------------- scenarios

Scenario = tuple[nn.Module, ActivationSparsifier, Callable[[], object]]


def _x(batch: int = 4, width: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(seed))


def _registered(**config: Any) -> tuple[Net, ActivationSparsifier]:
    model, s = make()
    s.register_layer(model.first, **config)
    s.register_layer(model.second)
    return model, s


def _calibrated(**config: Any) -> tuple[Net, ActivationSparsifier]:
    model, s = _registered(**config)
    model(_x(seed=1))
    model(_x(seed=2))
    return model, s


def _stepped(**config: Any) -> tuple[Net, ActivationSparsifier]:
    model, s = _calibrated(**config)
    s.step()
    return model, s


def _squashed(**config: Any) -> tuple[Net, ActivationSparsifier]:
    model, s = _stepped(**config)
    s.squash_mask()
    return model, s


def _state_dict(edit: Callable[[dict[str, Any]], object], phase: str = "calibrated") -> Scenario:
    """A state dict of one phase, edited, loaded into a calibrated sparsifier."""
    source = {"calibrated": _calibrated, "stepped": _stepped, "squashed": _squashed}[phase]
    _, donor = source(features=[0, [2, 3]], feature_dim=1)
    sd = donor.state_dict()
    edit(sd)
    model, s = _calibrated()
    return model, s, lambda: s.load_state_dict(sd)


def _mask_fn(result: Callable[[torch.Tensor], Any]) -> Callable[..., Any]:
    def mask_fn(data: torch.Tensor, sparsity_level: float) -> Any:
        return result(data)

    return mask_fn


def _raising(exc: Exception) -> Callable[..., Any]:
    def fn(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fn


def _with_first(config: dict[str, Any], action: str) -> Scenario:
    """Register ``first`` with ``config``; ``action`` is the bad call."""
    model, s = make()
    s.register_layer(model.second)
    if action == "register":
        return model, s, lambda: s.register_layer(model.first, **config)
    s.register_layer(model.first, **config)
    if action == "forward":
        return model, s, lambda: model(_x())
    model(_x())
    return model, s, s.step


def _shape_changing_aggregate() -> AggregateStrategy:
    # Claims to be elementwise but sums over the batch: the fused path refuses it.
    return AggregateStrategy(
        name="batch_sum",
        fn=lambda acc, x: acc + x.sum(dim=0),
        init=lambda x: torch.zeros(x.shape[1:], dtype=x.dtype),
        elementwise=True,
    )


def _only_first_saw_input() -> Scenario:
    model, s = _registered()
    model.first(_x())
    return model, s, s.step


def _nan_input() -> Scenario:
    model, s = _registered()
    x = _x()
    x[1, 2] = float("nan")
    model(x)
    return model, s, s.step


def _inf_input() -> Scenario:
    model, s = _registered()
    x = _x()
    x[0, 0] = float("inf")
    model(x)
    return model, s, s.step


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


# id -> (scenario, error, builtin, message pattern)
CASES: dict[str, tuple[Callable[[], Scenario], type[Exception], type[Exception], str]] = {
    # ---- registration
    "model is not a module": (
        lambda: (*make(), lambda: ActivationSparsifier("net")),  # type: ignore[arg-type]
        ConfigError,
        ValueError,
        "model must be a torch.nn.Module",
    ),
    "layer is not a module": (
        lambda: _with_first_call(lambda m, s: s.register_layer("first")),  # type: ignore[arg-type]
        ConfigError,
        AssertionError,
        "layer must be a torch.nn.Module, got str",
    ),
    "features without feature_dim": (
        lambda: _with_first({"features": [0, 1]}, "register"),
        ConfigError,
        AssertionError,
        r"layer 'first': features=\[0, 1\] needs feature_dim",
    ),
    "feature_dim not an int": (
        lambda: _with_first({"features": [0], "feature_dim": 1.0}, "register"),
        ConfigError,
        AssertionError,
        "layer 'first': feature_dim must be an int, got 1.0",
    ),
    "feature index negative": (
        lambda: _with_first({"features": [0, -1], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        r"layer 'first': features\[1\] holds the negative index -1",
    ),
    "feature index not an int": (
        lambda: _with_first({"features": [0, 1.5], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        r"layer 'first': features\[1\] must be an int or a non-empty list of ints, got 1.5",
    ),
    "feature index a bool": (
        lambda: _with_first({"features": [True], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        r"features\[0\] must be an int",
    ),
    "feature index twice": (
        lambda: _with_first({"features": [1, [2, 1]], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        r"feature index 1 is selected twice \(again in features\[1\]\)",
    ),
    "features empty": (
        lambda: _with_first({"features": [], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        "features must be a non-empty list",
    ),
    "strategy not callable": (
        lambda: _with_first({"reduce_fn": 3}, "register"),
        ConfigError,
        AssertionError,
        "layer 'first': reduce_fn must be callable or the name of a registered reduce strategy",
    ),
    "unknown strategy name": (
        lambda: _with_first({"aggregate_fn": "median"}, "register"),
        UnknownStrategyError,
        KeyError,
        r"layer 'first': unknown aggregate strategy 'median'; known: .*'sum'",
    ),
    "unknown strategy parameter": (
        lambda: _with_first({"level": 0.3}, "register"),
        ConfigError,
        ValueError,
        r"layer 'first': sparse_config for mask strategy 'magnitude' has unknown key\(s\) "
        r"'level'",
    ),
    "missing strategy parameter": (
        lambda: _with_first_call(
            lambda m, s: ActivationSparsifier(
                m, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude"
            ).register_layer(m.first)
        ),
        ConfigError,
        ValueError,
        r"missing key\(s\) 'sparsity_level'",
    ),
    # ---- first forward pass: checks against the input
    "feature index out of range": (
        lambda: _with_first({"features": [0, [2, 6]], "feature_dim": 1}, "forward"),
        ConfigError,
        ValueError,
        "layer 'first': feature index 6 is out of range for dimension 1 of size 6",
    ),
    "feature_dim out of range": (
        lambda: _with_first({"features": [0], "feature_dim": 2}, "forward"),
        ConfigError,
        ValueError,
        "layer 'first': feature_dim=2 is out of range for an input with 2 dimensions",
    ),
    "aggregate changes the shape": (
        lambda: _with_first(
            {"aggregate_fn": _shape_changing_aggregate(), "features": [1, 3], "feature_dim": 1},
            "forward",
        ),
        ConfigError,
        ValueError,
        r"layer 'first': aggregate strategy 'batch_sum' is marked elementwise but returned "
        r"shape \(2,\) for the selected features of shape \(4, 2\)",
    ),
    "aggregate raises": (
        lambda: _with_first({"aggregate_fn": _raising(ZeroDivisionError("boom"))}, "forward"),
        StrategyError,
        RuntimeError,
        r"layer 'first': aggregate strategy '<callable .*fn>' raised during the forward "
        r"pass: ZeroDivisionError\('boom'\)",
    ),
    "aggregate raises, fused features": (
        lambda: _with_first(
            {
                "aggregate_fn": AggregateStrategy(
                    name="bad", fn=_raising(RuntimeError("x")), elementwise=True
                ),
                "features": [0, 1],
                "feature_dim": 1,
            },
            "forward",
        ),
        StrategyError,
        RuntimeError,
        "layer 'first': aggregate strategy 'bad' raised",
    ),
    "aggregate raises, per feature": (
        lambda: _with_first(
            {"aggregate_fn": _raising(TypeError("t")), "features": [0, 1], "feature_dim": 1},
            "forward",
        ),
        StrategyError,
        RuntimeError,
        r"layer 'first': aggregate strategy .* raised during the forward pass: TypeError",
    ),
    # ---- step(): masks
    "mask of the wrong shape": (
        lambda: _with_first({"mask_fn": _mask_fn(lambda d: torch.ones(5))}, "step"),
        MaskError,
        ValueError,
        r"layer 'first': mask strategy .* returned a mask of shape \(5,\), which does not "
        r"broadcast to the input's \(4, 6\)",
    ),
    "mask grows the input": (
        lambda: _with_first({"mask_fn": _mask_fn(lambda d: torch.ones(2, 4, 6))}, "step"),
        MaskError,
        ValueError,
        "does not broadcast",
    ),
    "mask of a complex dtype": (
        lambda: _with_first(
            {"mask_fn": _mask_fn(lambda d: torch.ones(6, dtype=torch.complex64))}, "step"
        ),
        MaskError,
        ValueError,
        "torch.complex64 tensor; masks must be real",
    ),
    "mask on the meta device": (
        lambda: _with_first({"mask_fn": _mask_fn(lambda d: torch.ones(6, device="meta"))}, "step"),
        MaskError,
        ValueError,
        "meta device",
    ),
    "mask is sparse": (
        lambda: _with_first({"mask_fn": _mask_fn(lambda d: torch.ones(6).to_sparse())}, "step"),
        MaskError,
        ValueError,
        "masks must be dense",
    ),
    "mask not 0/1": (
        lambda: _with_first({"mask_fn": _mask_fn(lambda d: torch.full((6,), 0.5))}, "step"),
        MaskError,
        ValueError,
        "values other than 0 and 1",
    ),
    "mask with NaN": (
        lambda: _with_first(
            {"mask_fn": _mask_fn(lambda d: torch.full((6,), float("nan")))}, "step"
        ),
        MaskError,
        ValueError,
        "returned NaN",
    ),
    "mask not a tensor": (
        lambda: _with_first({"mask_fn": _mask_fn(lambda d: [1.0] * 6)}, "step"),
        MaskError,
        ValueError,
        "returned list, not a tensor",
    ),
    "mask strategy raises": (
        lambda: _with_first({"mask_fn": _raising(ArithmeticError("no"))}, "step"),
        MaskError,
        ValueError,
        r"layer 'first': computing the mask .* failed: ArithmeticError\('no'\)",
    ),
    "sparsity_level out of range": (
        lambda: _with_first({"sparsity_level": 1.5}, "step"),
        MaskError,
        ValueError,
        r"sparsity_level must lie in \[0, 1\]",
    ),
    "NaN activations": (
        _nan_input,
        MaskError,
        ValueError,
        r"layer 'first': the data that reduce 'mean' returned holds 1 NaN or Inf value",
    ),
    "Inf activations": (
        _inf_input,
        MaskError,
        ValueError,
        "NaN or Inf",
    ),
    # ---- workflow order
    "get_mask before any input": (
        lambda: (*(ms := _registered()), lambda: ms[1].get_mask("first")),
        MaskNotReadyError,
        ValueError,
        "layer 'first' has no mask yet",
    ),
    "get_mask of an unknown name": (
        lambda: (*(ms := _calibrated()), lambda: ms[1].get_mask("third")),
        LayerNotFoundError,
        ValueError,
        r"no layer named 'third' is registered \(registered: 'first', 'second'\)",
    ),
    "get_mask without a name or layer": (
        lambda: (*(ms := _calibrated()), lambda: ms[1].get_mask()),
        ConfigError,
        ValueError,
        "needs a layer name or a layer module",
    ),
    "step before any input": (
        lambda: (*(ms := _registered()), ms[1].step),
        StateError,
        KeyError,
        "layer 'first' has no aggregated data",
    ),
    "step before input of one layer": (
        lambda: _only_first_saw_input(),
        StateError,
        KeyError,
        "layer 'second' has no aggregated data",
    ),
    "step twice": (
        lambda: (*(ms := _stepped()), ms[1].step),
        StateError,
        KeyError,
        "has no aggregated data",
    ),
    "step after squash_mask": (
        lambda: (*(ms := _squashed()), ms[1].step),
        StateError,
        RuntimeError,
        "layer 'first' is squashed",
    ),
    "squash_mask before any input": (
        lambda: (*(ms := _registered()), ms[1].squash_mask),
        MaskNotReadyError,
        ValueError,
        "layer 'first' has no mask",
    ),
    "squash_mask twice": (
        lambda: (*(ms := _squashed()), ms[1].squash_mask),
        StateError,
        RuntimeError,
        "layer 'first' is already squashed",
    ),
    "squash_mask with an unknown argument": (
        lambda: (*(ms := _stepped()), lambda: ms[1].squash_mask(attach=True)),
        ConfigError,
        ValueError,
        "unexpected keyword argument",
    ),
    "squash_mask with a non-bool flag": (
        lambda: (*(ms := _stepped()), lambda: ms[1].squash_mask(attach_sparsify_hook="yes")),  # type: ignore[arg-type]
        ConfigError,
        ValueError,
        "attach_sparsify_hook must be a bool",
    ),
    "unregister an unknown name": (
        lambda: (*(ms := _calibrated()), lambda: ms[1].unregister_layer("third")),
        LayerNotFoundError,
        KeyError,
        "no layer named 'third'",
    ),
    # ---- load_state_dict
    "load: a layer the model lacks": (
        lambda: _state_dict(_rename_layer),
        LayerNotFoundError,
        AssertionError,
        "layer 'ghost' of the state dict is not in the model",
    ),
    "load: state of a layer without data group": (
        lambda: _state_dict(_extra_state),
        SerializationError,
        ValueError,
        "names layers without a data group: ghost",
    ),
    "load: data group without a key": (
        lambda: _state_dict(_delete(("data_groups", "first", "feature_dim"))),
        SerializationError,
        ValueError,
        r"data_groups\['first'\] lacks the key\(s\) 'feature_dim'",
    ),
    "load: unknown hook_state": (
        lambda: _state_dict(_set(("data_groups", "first", "hook_state"), "frozen")),
        SerializationError,
        ValueError,
        "hook_state",
    ),
    "load: missing state keys": (
        lambda: _state_dict(_delete(("defaults",))),
        SerializationError,
        ValueError,
        "lacks the key",
    ),
    "load: wrong format version": (
        lambda: _state_dict(_set(("format_version",), 99)),
        SerializationError,
        ValueError,
        "unknown state format_version 99",
    ),
    "load: one mask per feature expected": (
        lambda: _state_dict(_set(("state", "first", "mask"), [torch.ones(4, 1)])),
        SerializationError,
        ValueError,
        "must be a list with one tensor per feature",
    ),
    "load: data per feature expected": (
        lambda: _state_dict(_set(("data_groups", "first", "data"), torch.ones(4, 3))),
        SerializationError,
        ValueError,
        "the data of layer 'first' cannot be restored",
    ),
    "load: mask not 0/1": (
        lambda: _state_dict(_replace_mask("first", 1, lambda m: m * 2), "stepped"),
        MaskError,
        ValueError,
        r"layer 'first', features\[1\]: the state dict holds values other than 0 and 1",
    ),
    "load: mask does not fit the data": (
        lambda: _state_dict(_replace_mask("first", 0, lambda m: torch.ones(4, 3))),
        MaskError,
        ValueError,
        r"layer 'first', features\[0\]: the state dict holds a mask of shape \(4, 3\)",
    ),
    "load: mask on the meta device": (
        lambda: _state_dict(_replace_mask("first", 0, lambda m: m.to("meta")), "squashed"),
        MaskError,
        ValueError,
        "meta device",
    ),
    "load: squashed layer without mask": (
        lambda: _state_dict(_set(("state", "first", "mask"), None), "squashed"),
        SerializationError,
        ValueError,
        "is squashed but its state holds no mask",
    ),
    "load: unknown strategy name": (
        lambda: _state_dict(_set(("data_groups", "second", "mask_fn"), "topk_nope")),
        UnknownStrategyError,
        ValueError,
        "unknown mask strategy 'topk_nope'",
    ),
}


def _with_first_call(call: Callable[[Net, ActivationSparsifier], object]) -> Scenario:
    model, s = _calibrated()
    return model, s, lambda: call(model, s)


CASES["layer not in the model"] = (
    lambda: _with_first_call(lambda m, s: s.register_layer(nn.Linear(6, 6))),
    LayerNotFoundError,
    AssertionError,
    "layer Linear is not a submodule of the model",
)


# ---- threshold mode and registration by pattern

THRESHOLD = {
    "aggregate_fn": "abs_histogram",
    "reduce_fn": "identity",
    "mask_fn": "target_threshold",
}


def _threshold_stepped() -> tuple[Net, ActivationSparsifier]:
    """``first`` in threshold mode (its input has no zeros), ``second`` static."""
    model, s = make()
    s.register_layer(model.first, **THRESHOLD)
    s.register_layer(model.second)
    model(_x(seed=1))
    model(_x(seed=2))
    s.step()
    return model, s


def _on_threshold(call: Callable[[ActivationSparsifier], object]) -> Scenario:
    model, s = _threshold_stepped()
    return model, s, lambda: call(s)


def _threshold_calibrating(mask: torch.Tensor) -> Scenario:
    model, s = _threshold_stepped()
    model(_x(seed=3))

    def call() -> None:
        with s.valid_positions(mask):
            model(_x(seed=4))

    return model, s, call


CASES.update(
    {
        "register_layers: two rules select one layer": (
            lambda: _with_first_call(
                lambda m, s: s.register_layers({r"fir.*": None, nn.Linear: None})
            ),
            ConfigError,
            ValueError,
            "layer 'first' is selected by two rules",
        ),
        "register_layers: a rule selects nothing": (
            lambda: _with_first_call(lambda m, s: s.register_layers({r"third": None})),
            ConfigError,
            ValueError,
            "selected no layer",
        ),
        "register_layers: one bad config": (
            lambda: _with_first_call(
                lambda m, s: s.register_layers(
                    {r"first": {"sparsity_level": 0.2}, r"second": {"features": [0]}}
                )
            ),
            ConfigError,
            ValueError,
            "feature_dim",
        ),
        "threshold mode with features": (
            lambda: _with_first({**THRESHOLD, "features": [0], "feature_dim": 1}, "register"),
            ConfigError,
            ValueError,
            "does not take features",
        ),
        "get_mask of a threshold-mode layer": (
            lambda: _on_threshold(lambda s: s.get_mask("first")),
            MaskNotReadyError,
            ValueError,
            "threshold mode",
        ),
        "retarget a static layer": (
            lambda: _on_threshold(lambda s: s.retarget({"second": 0.3})),
            StateError,
            RuntimeError,
            "not in threshold mode",
        ),
        "retarget with one static layer changes no layer": (
            lambda: _on_threshold(lambda s: s.retarget({"first": 0.3, "second": 0.2})),
            StateError,
            RuntimeError,
            "layer 'second' is not in threshold mode",
        ),
        "retarget to a level above 1": (
            lambda: _on_threshold(lambda s: s.retarget({"first": 1.5})),
            ConfigError,
            ValueError,
            "sparsity_level",
        ),
        "retarget an unknown layer": (
            lambda: _on_threshold(lambda s: s.retarget({"ghost": 0.3})),
            LayerNotFoundError,
            KeyError,
            "no layer named 'ghost'",
        ),
        "valid_positions with a float mask": (
            lambda: _threshold_calibrating(torch.ones(4)),
            ConfigError,
            ValueError,
            "needs a bool tensor",
        ),
        "valid_positions of the wrong shape": (
            lambda: _threshold_calibrating(torch.ones(5, dtype=torch.bool)),
            ConfigError,
            ValueError,
            "does not match the leading dimensions",
        ),
    }
)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_misuse_raises_and_changes_nothing(case: str) -> None:
    build, error, builtin, match = CASES[case]
    model, sparsifier, call = build()
    before = snapshot(model, sparsifier)
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, ActsparseError)
    assert isinstance(info.value, builtin)
    assert_unchanged(before, snapshot(model, sparsifier))


# ----------------------------------------------------------- not errors, but easy to get wrong


def test_registering_a_layer_twice_warns_and_replaces_its_hook_and_data() -> None:
    model, s = _calibrated()
    old_hook = s.data_groups["first"]["hook"]
    with pytest.warns(UserWarning, match="layer 'first' is already registered"):
        s.register_layer(model.first, sparsity_level=0.25)
    assert list(model.first._forward_pre_hooks) == [s.data_groups["first"]["hook"].id]
    assert s.data_groups["first"]["hook"] is not old_hook
    assert "data" not in s.data_groups["first"]
    assert s.state["first"]["mask"] is None
    assert s.data_groups["first"]["sparse_config"] == {"sparsity_level": 0.25}


# ------------------------------------------------------------- faults during a forward pass


def _flaky() -> tuple[dict[str, bool], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """A sum aggregate that raises while ``switch["broken"]`` is set.

    A function (not an object) so that the deep-copied configuration compares equal.
    """
    switch = {"broken": False}

    def flaky_sum(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if switch["broken"]:
            raise FloatingPointError("sensor glitch")
        return acc + x

    return switch, flaky_sum


@pytest.mark.parametrize(
    "features",
    [None, [1, [0, 4]]],
    ids=["whole input", "features, one call per feature"],
)
def test_a_raising_strategy_keeps_the_model_usable_and_the_state_consistent(
    features: list[Any] | None,
) -> None:
    switch, flaky = _flaky()
    model, s = make()
    extra = {} if features is None else {"features": features, "feature_dim": 1}
    s.register_layer(model.first, aggregate_fn=flaky, **extra)
    reference = Net()
    reference.load_state_dict(model.state_dict())

    switch["broken"] = True
    before = snapshot(model, s)
    with pytest.raises(StrategyError, match="sensor glitch") as info:
        model(_x(seed=1))
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert_unchanged(before, snapshot(model, s))
    # A failed first pass records nothing: no placeholder mask, no input shape.
    with pytest.raises(MaskNotReadyError):
        s.get_mask("first")

    switch["broken"] = False
    model(_x(seed=2))
    switch["broken"] = True
    before = snapshot(model, s)
    with pytest.raises(StrategyError):
        model(_x(seed=3))
    assert_unchanged(before, snapshot(model, s))

    switch["broken"] = False
    model(_x(seed=4))
    # The data holds exactly the passes that succeeded.
    expected = _x(seed=2) + _x(seed=4)
    data = s.data_groups["first"]["data"]
    if features is None:
        torch.testing.assert_close(data, expected)
    else:
        for group, part in zip([[1], [0, 4]], data, strict=True):
            torch.testing.assert_close(part, expected[:, group])
    s.step()
    s.squash_mask()
    x = _x(seed=5)
    assert model(x).shape == (4, 3)
    # After unregistering, the model is the plain model again.
    s.unregister_layer("first")
    torch.testing.assert_close(model(x), reference(x))


def test_a_bad_feature_index_leaves_the_model_usable_after_unregistering() -> None:
    model, s = make()
    s.register_layer(model.first, features=[7], feature_dim=1)
    reference = Net()
    reference.load_state_dict(model.state_dict())
    with pytest.raises(ConfigError, match="feature index 7 is out of range"):
        model(_x())
    s.unregister_layer("first")
    assert model.first._forward_pre_hooks == {}
    torch.testing.assert_close(model(_x()), reference(_x()))


def test_a_mask_that_would_grow_the_input_is_refused_on_the_forward_pass() -> None:
    # squash_mask() without step() applies torch.ao's ones placeholder of the first
    # input's shape; multiplying a smaller batch by it would silently grow the output.
    model, s = _calibrated()
    s.squash_mask()
    before = snapshot(model, s)
    with pytest.raises(MaskError, match=r"layer 'first': its mask of shape \(4, 6\) does not"):
        model(_x(batch=1))
    assert_unchanged(before, snapshot(model, s))
    assert model(_x(batch=4)).shape == (4, 3)


@pytest.mark.parametrize("phase", ["calibrated", "squashed"])
def test_a_state_dict_of_another_width_fails_on_the_first_forward_pass(phase: str) -> None:
    source = {"calibrated": _calibrated, "squashed": _squashed}[phase]
    _, donor = source()
    wide = Net(width=8)
    s = ActivationSparsifier(wide)
    s.load_state_dict(donor.state_dict())  # nothing in the state dict says the width
    before = snapshot(wide, s)
    error = StrategyError if phase == "calibrated" else MaskError
    with pytest.raises(error, match="layer 'first'") as info:
        wide(_x(width=8))
    assert isinstance(info.value, RuntimeError if phase == "calibrated" else ValueError)
    assert_unchanged(before, snapshot(wide, s))
    s.unregister_layer("first")
    assert wide(_x(width=8)).shape == (4, 3)


# ----------------------------------------------------------------------------- plugins


class _DuplicateMagnitude:
    @hookimpl
    def actsparse_mask_strategies(self) -> list[MaskStrategy]:
        return [MaskStrategy(name="magnitude", fn=lambda data: data)]


class _RaisingHook:
    @hookimpl
    def actsparse_reduce_strategies(self) -> list[Any]:
        raise OSError("cannot read the table")


class _NotAList:
    @hookimpl
    def actsparse_reduce_strategies(self) -> Any:
        return ReduceStrategy(name="max", fn=torch.amax)


def _plugin_snapshot() -> tuple[Any, ...]:
    pm = get_plugin_manager()
    registry = get_registry()
    return (
        registry,
        sorted(name for name, _ in pm.list_name_plugin()),
        {kind: registry.names(kind) for kind in KINDS},
    )


@pytest.mark.parametrize(
    ("plugin", "error", "builtin", "match"),
    [
        (
            _DuplicateMagnitude(),
            DuplicateStrategyError,
            ValueError,
            r"mask strategy 'magnitude' is registered twice: by plugin 'actsparse.masks' "
            r"\(actsparse-masks .*\) and by plugin 'bad'",
        ),
        (
            _RaisingHook(),
            PluginError,
            RuntimeError,
            r"plugin 'bad' raised in actsparse_reduce_strategies\(\): OSError",
        ),
        (
            _NotAList(),
            PluginError,
            RuntimeError,
            r"plugin 'bad': actsparse_reduce_strategies\(\) must return a list",
        ),
    ],
    ids=["duplicate name", "hook raises", "hook returns a record, not a list"],
)
def test_a_bad_plugin_is_refused_and_changes_nothing(
    plugin: object, error: type[Exception], builtin: type[Exception], match: str
) -> None:
    before = _plugin_snapshot()
    with pytest.raises(error, match=match) as info:
        register_plugin(plugin, name="bad")
    assert isinstance(info.value, ActsparseError)
    assert isinstance(info.value, builtin)
    after = _plugin_snapshot()
    assert after[0] is before[0]
    assert after[1:] == before[1:]
    model, s = make()
    s.register_layer(model.first)  # the built-ins still resolve


def test_duplicates_between_two_plugins_of_an_isolated_manager_name_both() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(_DuplicateMagnitude(), name="one")
    pm.register(_DuplicateMagnitude(), name="two")
    with pytest.raises(DuplicateStrategyError, match="by plugin 'one' and by plugin 'two'"):
        Registry.from_plugin_manager(pm)


class _EntryPoint:
    """What ``importlib.metadata.entry_points`` yields, for a plugin that fails to import."""

    def __init__(self, name: str, dist: str | None) -> None:
        self.name = name
        self.value = "actsparse_no_such_module:plugin"
        self.dist = None if dist is None else SimpleNamespace(name=dist, version="0.0.1")

    def load(self) -> object:
        raise ImportError("No module named 'actsparse_no_such_module'")


@pytest.fixture
def broken_entry_point(monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], None]:
    real = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

    def install(dist: str | None) -> None:
        def entry_points(**kwargs: Any) -> list[Any]:
            assert kwargs == {"group": ENTRY_POINT_GROUP}
            return [*real, _EntryPoint("broken", dist)]

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    return install


def test_a_third_party_plugin_that_fails_to_import_is_named_and_skipped(
    broken_entry_point: Callable[[str | None], None],
) -> None:
    broken_entry_point("actsparse-contrib")
    with pytest.warns(PluginWarning, match=r"skipped plugin 'broken' .*actsparse-contrib.*"):
        pm = make_plugin_manager(blocked=())
    assert pm.get_plugin("broken") is None
    registry = Registry.from_plugin_manager(pm)
    assert "magnitude" in registry.names("mask")


def test_a_blocked_plugin_is_not_imported(
    broken_entry_point: Callable[[str | None], None],
) -> None:
    broken_entry_point(None)
    pm = make_plugin_manager(blocked={"broken"})  # no warning: pytest turns them into errors
    assert pm.get_plugin("broken") is None


def test_a_first_party_plugin_that_fails_to_import_raises(
    broken_entry_point: Callable[[str | None], None],
) -> None:
    broken_entry_point("actsparse-masks")
    with pytest.raises(PluginError, match=r"built-in plugin 'broken'.*failed to import") as info:
        make_plugin_manager(blocked=())
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, ImportError)
