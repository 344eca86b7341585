"""Misuse found on a forward pass: checks against the input, strategies that raise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _misuse_table import (
    Misuse,
    Net,
    calibrated,
    check_misuse,
    make,
    misuse_table,
    raising,
    sample,
    with_first,
)
from _support import assert_unchanged, snapshot

from actsparse.core import (
    AggregateStrategy,
    ConfigError,
    MaskError,
    MaskNotReadyError,
    StrategyError,
)
from actsparse.hooks import WorkflowWarning


def _shape_changing_aggregate() -> AggregateStrategy:
    # Claims to be elementwise but sums over the batch: the fused path refuses it.
    return AggregateStrategy(
        name="batch_sum",
        fn=lambda acc, x: acc + x.sum(dim=0),
        init=lambda x: torch.zeros(x.shape[1:], dtype=x.dtype),
        elementwise=True,
    )


CASES: dict[str, Misuse] = {
    "feature index out of range": Misuse(
        lambda: with_first({"features": [0, [2, 6]], "feature_dim": 1}, "forward"),
        ConfigError,
        ValueError,
        "layer 'first': feature index 6 is out of range for dimension 1 of size 6",
    ),
    "feature_dim out of range": Misuse(
        lambda: with_first({"features": [0], "feature_dim": 2}, "forward"),
        ConfigError,
        ValueError,
        "layer 'first': feature_dim=2 is out of range for an input with 2 dimensions",
    ),
    "aggregate changes the shape": Misuse(
        lambda: with_first(
            {"aggregate_fn": _shape_changing_aggregate(), "features": [1, 3], "feature_dim": 1},
            "forward",
        ),
        ConfigError,
        ValueError,
        r"layer 'first': aggregate strategy 'batch_sum' is marked elementwise but returned "
        r"shape \(2,\) for the selected features of shape \(4, 2\)",
    ),
    "aggregate raises": Misuse(
        lambda: with_first({"aggregate_fn": raising(ZeroDivisionError("boom"))}, "forward"),
        StrategyError,
        RuntimeError,
        r"layer 'first': aggregate strategy '<callable .*fn>' raised during the forward "
        r"pass: ZeroDivisionError\('boom'\)",
    ),
    "aggregate raises, fused features": Misuse(
        lambda: with_first(
            {
                "aggregate_fn": AggregateStrategy(
                    name="bad", fn=raising(RuntimeError("x")), elementwise=True
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
    "aggregate raises, per feature": Misuse(
        lambda: with_first(
            {"aggregate_fn": raising(TypeError("t")), "features": [0, 1], "feature_dim": 1},
            "forward",
        ),
        StrategyError,
        RuntimeError,
        r"layer 'first': aggregate strategy .* raised during the forward pass: TypeError",
    ),
}


@misuse_table(CASES)
def test_misuse_raises_and_changes_nothing(case: Misuse) -> None:
    check_misuse(case)


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
        model(sample(seed=1))
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert_unchanged(before, snapshot(model, s))
    # A failed first pass records nothing: no placeholder mask, no input shape.
    with pytest.raises(MaskNotReadyError):
        s.get_mask("first")

    switch["broken"] = False
    model(sample(seed=2))
    switch["broken"] = True
    before = snapshot(model, s)
    with pytest.raises(StrategyError):
        model(sample(seed=3))
    assert_unchanged(before, snapshot(model, s))

    switch["broken"] = False
    model(sample(seed=4))
    # The data holds exactly the passes that succeeded.
    expected = sample(seed=2) + sample(seed=4)
    data = s.data_groups["first"]["data"]
    if features is None:
        torch.testing.assert_close(data, expected)
    else:
        for group, part in zip([[1], [0, 4]], data, strict=True):
            torch.testing.assert_close(part, expected[:, group])
    s.step()
    s.squash_mask()
    x = sample(seed=5)
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
        model(sample())
    s.unregister_layer("first")
    assert model.first._forward_pre_hooks == {}
    torch.testing.assert_close(model(sample()), reference(sample()))


def test_a_mask_that_would_grow_the_input_is_refused_on_the_forward_pass() -> None:
    # squash_mask() without step() applies torch.ao's ones placeholder of the first
    # input's shape; multiplying a smaller batch by it would silently grow the output.
    model, s = calibrated()
    with pytest.warns(WorkflowWarning, match="no step"):
        s.squash_mask()
    before = snapshot(model, s)
    with pytest.raises(MaskError, match=r"layer 'first': its mask of shape \(4, 6\) does not"):
        model(sample(batch=1))
    assert_unchanged(before, snapshot(model, s))
    assert model(sample(batch=4)).shape == (4, 3)
