"""Each built-in strategy's ``check`` refuses, at registration, the values its function refuses.

The check sees only the ``sparse_config`` values, never the data: what depends
on the data (``k`` against the size along ``dim``, ``dim`` against the rank)
is left to the function at ``step()``. Everything else must agree: a value
the check accepts is one the function accepts, and the reverse.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.core import ConfigError, get_registry
from actsparse.hooks import ActivationSparsifier

# 4 x 4: every k drawn below (at most 4) fits along either dim
DATA = torch.tensor(
    [[0.5, -2.0, 1.0, 0.1], [3.0, 0.2, -0.7, 1.5], [0.3, -0.4, 2.5, 0.05], [1.2, -0.9, 0.6, 2.2]]
)

NOT_NUMBERS: list[Any] = ["0.5", None, True, [0.5], math.nan]
LEVELS = st.sampled_from([0, 1, 0.0, 0.25, 1.0, -0.1, 1.5, math.inf, *NOT_NUMBERS])
INTS = st.sampled_from([-1, 0, 1, 2, 3, 4, 2.0, "2", None, False])
DIMS = st.sampled_from([-2, -1, 0, 1, 1.0, "0", True])

# Per mask strategy: the values to draw for each of its keys (None: leave the key out).
KEYS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "magnitude": {"sparsity_level": LEVELS},
    "threshold": {"threshold": st.sampled_from([0, 0.5, -1.0, math.inf, *NOT_NUMBERS])},
    "topk": {
        "k": st.none() | INTS,
        "fraction": st.none() | LEVELS,
        "dim": st.none() | DIMS,
    },
    "n_m": {"n": INTS, "m": INTS, "dim": DIMS},
    "block_norm": {
        "sparsity_level": LEVELS,
        "sparse_block_shape": st.sampled_from([(1, 4), [2, 2], (1,), (0, 2), "12", (1, 2.0)]),
        "zeros_per_block": st.none() | INTS,
        "norm": st.sampled_from(["L1", "L2", "l1", 2]),
    },
}
OPTIONAL = {("topk", "dim"), ("n_m", "dim"), ("block_norm", "sparse_block_shape")}
OPTIONAL |= {("block_norm", "zeros_per_block"), ("block_norm", "norm")}


@st.composite
def configs(draw: Any, name: str) -> dict[str, Any]:
    config = {}
    for key, values in KEYS[name].items():
        if (name, key) in OPTIONAL and draw(st.booleans()):
            continue
        value = draw(values)
        if name == "topk" and key in ("k", "fraction") and value is None:
            continue  # topk treats None as absent
        config[key] = value
    return config


def _refuses(call: Any) -> bool:
    try:
        call()
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("name", list(KEYS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_check_agrees_with_the_function(name: str, data: st.DataObject) -> None:
    record = get_registry().get("mask", name)
    config = data.draw(configs(name))
    by_check = _refuses(lambda: record.check(config))
    by_function = _refuses(lambda: record.fn(DATA, **config))
    assert by_check == by_function, (config, by_check, by_function)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"sparsity_level": "0.5"}, r"sparsity_level must be a number in \[0, 1\], got '0.5'"),
        ({"sparsity_level": 1.5}, r"sparsity_level must lie in \[0, 1\], got 1.5"),
        ({"sparsity_level": -0.5}, r"sparsity_level must lie in \[0, 1\]"),
    ],
)
def test_target_threshold_checks_its_level(config: dict[str, Any], match: str) -> None:
    record = get_registry().get("mask", "target_threshold")
    with pytest.raises(ConfigError, match=match):
        record.check(config)
    record.check({"sparsity_level": 0.5})


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("abs_histogram", {"bins_per_octave": 24}, "bins_per_octave must be a power of two"),
        ("abs_histogram", {"log2_range": (4, 2)}, "log2_range must be two ints"),
        ("abs_mean", {"sample_dims": "0"}, "sample_dims must be an int or a list of ints"),
        ("abs_max", {"sample_dims": [0, 0]}, r"sample_dims=\[0, 0\] names a dimension twice"),
        ("mean", {"sample_dims": [0, 1.0]}, "sample_dims must be an int or a list of ints"),
    ],
)
def test_aggregate_checks(name: str, config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_registry().get("aggregate", name).check(config)


@pytest.mark.parametrize("name", ["abs_histogram", "mean", "abs_mean", "sq_mean", "abs_max"])
def test_aggregate_checks_accept_the_defaults(name: str) -> None:
    get_registry().get("aggregate", name).check({})


def test_every_builtin_mask_strategy_declares_a_check() -> None:
    registry = get_registry()
    for entry in registry.entries("mask"):
        if entry.distribution == "actsparse-masks":
            assert entry.record.check is not None, entry.record.name
    for entry in registry.entries("aggregate"):
        if entry.distribution == "actsparse-masks" and entry.record.params:
            assert entry.record.check is not None, entry.record.name


def test_a_bad_value_is_refused_at_registration_not_at_step() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    s = ActivationSparsifier(model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude")
    with pytest.raises(ConfigError, match=r"layer '0': .*'magnitude': sparsity_level must be"):
        s.register_layer(model[0], sparsity_level="0.5")
    assert s.data_groups == {}
