"""Misuse of threshold mode: its registration, get_mask(), retarget() and valid_positions()."""

from __future__ import annotations

import torch
from _misuse_table import (
    Misuse,
    Net,
    Scenario,
    after,
    check_misuse,
    make,
    misuse_table,
    sample,
    with_first,
)

from actsparse.core import ConfigError, LayerNotFoundError, MaskNotReadyError, StateError
from actsparse.hooks import ActivationSparsifier

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
    model(sample(seed=1))
    model(sample(seed=2))
    s.step()
    return model, s


def _threshold_calibrating(mask: torch.Tensor) -> Scenario:
    model, s = _threshold_stepped()
    model(sample(seed=3))

    def call() -> None:
        with s.valid_positions(mask):
            model(sample(seed=4))

    return model, s, call


CASES: dict[str, Misuse] = {
    "threshold mode with features": Misuse(
        lambda: with_first({**THRESHOLD, "features": [0], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        "does not take features",
    ),
    "get_mask of a threshold-mode layer": Misuse(
        lambda: after(_threshold_stepped, lambda m, s: s.get_mask("first")),
        MaskNotReadyError,
        ValueError,
        "threshold mode",
    ),
    "retarget a static layer": Misuse(
        lambda: after(_threshold_stepped, lambda m, s: s.retarget({"second": 0.3})),
        StateError,
        RuntimeError,
        "not in threshold mode",
    ),
    "retarget with one static layer changes no layer": Misuse(
        lambda: after(_threshold_stepped, lambda m, s: s.retarget({"first": 0.3, "second": 0.2})),
        StateError,
        RuntimeError,
        "layer 'second' is not in threshold mode",
    ),
    "retarget to a level above 1": Misuse(
        lambda: after(_threshold_stepped, lambda m, s: s.retarget({"first": 1.5})),
        ConfigError,
        ValueError,
        "sparsity_level",
    ),
    "retarget an unknown layer": Misuse(
        lambda: after(_threshold_stepped, lambda m, s: s.retarget({"ghost": 0.3})),
        LayerNotFoundError,
        KeyError,
        "no layer named 'ghost'",
    ),
    "valid_positions with a float mask": Misuse(
        lambda: _threshold_calibrating(torch.ones(4)),
        ConfigError,
        ValueError,
        "needs a bool tensor",
    ),
    "valid_positions of the wrong shape": Misuse(
        lambda: _threshold_calibrating(torch.ones(5, dtype=torch.bool)),
        ConfigError,
        ValueError,
        "does not match the leading dimensions",
    ),
}


@misuse_table(CASES)
def test_misuse_raises_and_changes_nothing(case: Misuse) -> None:
    check_misuse(case)
