"""Misuse of the constructor, register_layer, register_layers and unregister_layer."""

from __future__ import annotations

import math

import pytest
from _misuse_table import (
    Misuse,
    after,
    calibrated,
    check_misuse,
    make,
    misuse_table,
    with_first,
)
from torch import nn

from actsparse.core import ConfigError, LayerNotFoundError, UnknownStrategyError
from actsparse.hooks import ActivationSparsifier, WorkflowWarning

NAN = math.nan

CASES: dict[str, Misuse] = {
    "model is not a module": Misuse(
        lambda: after(make, lambda m, s: ActivationSparsifier("net")),  # type: ignore[arg-type]
        ConfigError,
        ValueError,
        "model must be a torch.nn.Module",
    ),
    "layer is not a module": Misuse(
        lambda: after(calibrated, lambda m, s: s.register_layer("first")),  # type: ignore[arg-type]
        ConfigError,
        AssertionError,
        "layer must be a torch.nn.Module, got str",
    ),
    "layer not in the model": Misuse(
        lambda: after(calibrated, lambda m, s: s.register_layer(nn.Linear(6, 6))),
        LayerNotFoundError,
        AssertionError,
        "layer Linear is not a submodule of the model",
    ),
    "features without feature_dim": Misuse(
        lambda: with_first({"features": [0, 1]}, "register"),
        ConfigError,
        AssertionError,
        r"layer 'first': features=\[0, 1\] needs feature_dim",
    ),
    "feature_dim not an int": Misuse(
        lambda: with_first({"features": [0], "feature_dim": 1.0}, "register"),
        ConfigError,
        AssertionError,
        "layer 'first': feature_dim must be an int, got 1.0",
    ),
    "feature index negative": Misuse(
        lambda: with_first({"features": [0, -1], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        r"layer 'first': features\[1\] holds the negative index -1",
    ),
    "feature index not an int": Misuse(
        lambda: with_first({"features": [0, 1.5], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        r"layer 'first': features\[1\] must be an int or a non-empty list of ints, got 1.5",
    ),
    "feature index a bool": Misuse(
        lambda: with_first({"features": [True], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        r"features\[0\] must be an int",
    ),
    "feature index twice": Misuse(
        lambda: with_first({"features": [1, [2, 1]], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        r"feature index 1 is selected twice \(again in features\[1\]\)",
    ),
    "features empty": Misuse(
        lambda: with_first({"features": [], "feature_dim": 1}, "register"),
        ConfigError,
        ValueError,
        "features must be a non-empty list",
    ),
    "strategy not callable": Misuse(
        lambda: with_first({"reduce_fn": 3}, "register"),
        ConfigError,
        AssertionError,
        "layer 'first': reduce_fn must be callable or the name of a registered reduce strategy",
    ),
    "unknown strategy name": Misuse(
        lambda: with_first({"aggregate_fn": "median"}, "register"),
        UnknownStrategyError,
        KeyError,
        r"layer 'first': unknown aggregate strategy 'median' \(did you mean 'mean'.*\?\); "
        r"known: .*'sum'",
    ),
    "unknown strategy parameter": Misuse(
        lambda: with_first({"level": 0.3}, "register"),
        ConfigError,
        ValueError,
        r"layer 'first': sparse_config for mask strategy 'magnitude' has unknown key\(s\) "
        r"'level'",
    ),
    "missing strategy parameter": Misuse(
        lambda: after(
            calibrated,
            lambda m, s: ActivationSparsifier(
                m, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude"
            ).register_layer(m.first),
        ),
        ConfigError,
        ValueError,
        r"missing key\(s\) 'sparsity_level'",
    ),
    # ---- sparse_config values, checked by the strategy's check at registration
    "sparsity_level a string": Misuse(
        lambda: with_first({"sparsity_level": "0.5"}, "register"),
        ConfigError,
        ValueError,
        r"layer 'first': sparse_config for mask strategy 'magnitude': sparsity_level must be "
        r"a number in \[0, 1\], got '0.5'",
    ),
    "sparsity_level out of range": Misuse(
        lambda: with_first({"sparsity_level": 1.5}, "register"),
        ConfigError,
        AssertionError,
        r"layer 'first': .*'magnitude': sparsity_level must lie in \[0, 1\], got 1.5",
    ),
    "sparsity_level NaN in the defaults": Misuse(
        lambda: after(
            calibrated,
            lambda m, s: ActivationSparsifier(
                m, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=NAN
            ).register_layer(m.first),
        ),
        ConfigError,
        ValueError,
        "sparsity_level must be a number",
    ),
    "topk without k or fraction": Misuse(
        lambda: after(
            calibrated,
            lambda m, s: ActivationSparsifier(
                m, aggregate_fn="sum", reduce_fn="mean", mask_fn="topk"
            ).register_layer(m.first),
        ),
        ConfigError,
        ValueError,
        r"layer 'first': sparse_config for mask strategy 'topk': topk needs exactly one of k "
        r"and fraction, got neither",
    ),
    "topk with both k and fraction": Misuse(
        lambda: after(
            calibrated,
            lambda m, s: ActivationSparsifier(
                m, aggregate_fn="sum", reduce_fn="mean", mask_fn="topk"
            ).register_layer(m.first, k=2, fraction=0.5),
        ),
        ConfigError,
        ValueError,
        r"'topk': topk needs exactly one of k and fraction, got k=2 and fraction=0.5",
    ),
    "n_m with n > m": Misuse(
        lambda: after(
            calibrated,
            lambda m, s: ActivationSparsifier(
                m, aggregate_fn="sum", reduce_fn="mean", mask_fn="n_m"
            ).register_layer(m.first, n=4, m=2),
        ),
        ConfigError,
        ValueError,
        r"'n_m': n must be an int in \[0, m=2\], got 4",
    ),
    "block_norm with a bad block shape": Misuse(
        lambda: with_first({"mask_fn": "block_norm", "sparse_block_shape": (2, 0)}, "register"),
        ConfigError,
        ValueError,
        r"'block_norm': sparse_block_shape must be two positive ints, got \(2, 0\)",
    ),
    "threshold mode with a level out of range": Misuse(
        lambda: with_first(
            {
                "aggregate_fn": "abs_histogram",
                "reduce_fn": "identity",
                "mask_fn": "target_threshold",
                "sparsity_level": -0.1,
            },
            "register",
        ),
        ConfigError,
        ValueError,
        r"'target_threshold': sparsity_level must lie in \[0, 1\], got -0.1",
    ),
    "aggregate option of the wrong type": Misuse(
        lambda: with_first(
            {"aggregate_fn": "abs_mean", "reduce_fn": "identity", "sample_dims": "0"}, "register"
        ),
        ConfigError,
        ValueError,
        r"aggregate strategy 'abs_mean': sample_dims must be an int or a list of ints, got '0'",
    ),
    "register_layers: two rules select one layer": Misuse(
        lambda: after(
            calibrated, lambda m, s: s.register_layers({r"fir.*": None, nn.Linear: None})
        ),
        ConfigError,
        ValueError,
        "layer 'first' is selected by two rules",
    ),
    "register_layers: a rule selects nothing": Misuse(
        lambda: after(calibrated, lambda m, s: s.register_layers({r"third": None})),
        ConfigError,
        ValueError,
        "selected no layer",
    ),
    "register_layers: one bad config": Misuse(
        lambda: after(
            calibrated,
            lambda m, s: s.register_layers(
                {r"first": {"sparsity_level": 0.2}, r"second": {"features": [0]}}
            ),
        ),
        ConfigError,
        ValueError,
        "feature_dim",
    ),
    "unregister an unknown name": Misuse(
        lambda: after(calibrated, lambda m, s: s.unregister_layer("third")),
        LayerNotFoundError,
        KeyError,
        "no layer named 'third'",
    ),
}


@misuse_table(CASES)
def test_misuse_raises_and_changes_nothing(case: Misuse) -> None:
    check_misuse(case)


# ----------------------------------------------------------- not an error, but easy to get wrong


def test_registering_a_layer_twice_warns_and_replaces_its_hook_and_data() -> None:
    model, s = calibrated()
    old_hook = s.data_groups["first"]["hook"]
    with pytest.warns(
        WorkflowWarning,
        match=r"layer 'first' is already registered: registering it again replaces its "
        r"configuration and discards its aggregated data and mask; .*"
        r"sparsifier.update_config\(name, key=value\)",
    ):
        s.register_layer(model.first, sparsity_level=0.25)
    assert list(model.first._forward_pre_hooks) == [s.data_groups["first"]["hook"].id]
    assert s.data_groups["first"]["hook"] is not old_hook
    assert "data" not in s.data_groups["first"]
    assert s.state["first"]["mask"] is None
    assert s.data_groups["first"]["sparse_config"] == {"sparsity_level": 0.25}
