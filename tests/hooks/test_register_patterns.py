"""register_layers: many layers in one call, selected by name pattern and/or module type."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from actsparse.core import ConfigError, UnknownStrategyError
from actsparse.hooks import ActivationSparsifier, LayerRule


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.down = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.head(x)


def make() -> tuple[Model, ActivationSparsifier]:
    model = Model()
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="abs_mean", reduce_fn="identity", mask_fn="magnitude"
    )
    return model, sparsifier


def test_regex_and_type_rules_each_with_own_config() -> None:
    model, sparsifier = make()
    names = sparsifier.register_layers(
        {
            r"layers\.\d+\.up": {"sparsity_level": 0.25},
            r"layers\.\d+\.down": {"sparsity_level": 0.5},
        }
    )
    assert names == [f"layers.{i}.{p}" for i in range(3) for p in ("up", "down")]
    groups = sparsifier.data_groups
    assert set(groups) == set(names)
    assert groups["layers.1.up"]["sparse_config"] == {"sparsity_level": 0.25}
    assert groups["layers.2.down"]["sparse_config"] == {"sparsity_level": 0.5}
    model(torch.randn(5, 4))
    sparsifier.step()
    assert int((sparsifier.get_mask("layers.0.up") == 0).sum()) == 1  # round(0.25 * 4)
    assert int((sparsifier.get_mask("layers.0.down") == 0).sum()) == 4  # round(0.5 * 8)


def test_type_rule_selects_every_instance() -> None:
    model, sparsifier = make()
    names = sparsifier.register_layers({nn.Linear: {"sparsity_level": 0.5}})
    assert names == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(names) == 7


def test_fullmatch_not_search() -> None:
    _model, sparsifier = make()
    # "up" alone matches no full name; a search would have matched three layers.
    with pytest.raises(ConfigError, match="selected no layer"):
        sparsifier.register_layers({"up": {"sparsity_level": 0.5}})
    assert sparsifier.register_layers({"up": None}, missing_ok=True) == []


def test_pattern_and_type_together() -> None:
    _model, sparsifier = make()
    rule = LayerRule(
        pattern=r"layers\.0\..*", module_type=nn.Linear, config={"sparsity_level": 0.5}
    )
    assert sparsifier.register_layers([rule]) == ["layers.0.up", "layers.0.down"]


def test_list_of_pairs_and_compiled_regex() -> None:
    _model, sparsifier = make()
    names = sparsifier.register_layers(
        [(re.compile(r"head"), {"sparsity_level": 0.5}), ((nn.ReLU,), {"sparsity_level": 0.5})]
    )
    assert names == ["layers.0.act", "layers.1.act", "layers.2.act", "head"]


def test_rule_config_overrides_defaults_like_register_layer() -> None:
    _model, sparsifier = make()
    sparsifier.register_layers(
        {r"head": {"aggregate_fn": "abs_max", "sparsity_level": 0.5, "features": None}}
    )
    group = sparsifier.data_groups["head"]
    assert group["aggregate_fn"] == "abs_max"
    assert group["reduce_fn"] == "identity"  # from the defaults
    assert group["features"] is None
    assert group["sparse_config"] == {"sparsity_level": 0.5}


def test_two_rules_on_one_layer_name_both_and_register_nothing() -> None:
    model, sparsifier = make()
    with pytest.raises(ConfigError) as info:
        sparsifier.register_layers(
            {r"layers\.\d+\.up": {"sparsity_level": 0.5}, nn.Linear: {"sparsity_level": 0.25}}
        )
    message = str(info.value)
    assert "'layers.0.up'" in message
    assert r"pattern='layers\\.\\d+\\.up'" in message
    assert "module_type=Linear" in message
    assert not sparsifier.data_groups
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_one_invalid_config_registers_nothing() -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model.head, sparsity_level=0.5)
    before = sparsifier.data_groups["head"]["sparse_config"]
    with pytest.raises(ConfigError, match=r"rule\(pattern='layers\\\\.2\\\\.down'\)"):
        sparsifier.register_layers(
            {
                r"layers\.[01]\.down": {"sparsity_level": 0.5},
                r"layers\.2\.down": {"no_such_key": 1},
            }
        )
    assert list(sparsifier.data_groups) == ["head"]
    assert sparsifier.data_groups["head"]["sparse_config"] == before
    with pytest.raises(UnknownStrategyError, match=r"layers\.0\.up"):
        sparsifier.register_layers({r"layers\.0\.up": {"mask_fn": "nope", "sparsity_level": 0.5}})
    assert list(sparsifier.data_groups) == ["head"]
    hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks]
    assert hooked == ["head"]


def test_registering_again_warns_once_and_replaces() -> None:
    model, sparsifier = make()
    sparsifier.register_layers({nn.ReLU: {"sparsity_level": 0.5}})
    with pytest.warns(UserWarning, match="already registered") as record:
        sparsifier.register_layers({nn.ReLU: {"sparsity_level": 0.25}})
    assert len(record) == 1
    assert sparsifier.data_groups["layers.1.act"]["sparse_config"] == {"sparsity_level": 0.25}
    assert all(len(m._forward_pre_hooks) == 1 for m in model.modules() if isinstance(m, nn.ReLU))


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ({}, "rules is empty"),
        ("head", "rules must be a mapping"),
        ([("head",)], r"rules\[0\] must be a LayerRule"),
        ({"(": None}, "not a valid regex"),
        ({int: None}, "module_type must be an nn.Module subclass"),
        ({"head": 3}, "config must be a mapping"),
    ],
)
def test_malformed_rules_are_refused(rules: object, match: str) -> None:
    _model, sparsifier = make()
    with pytest.raises(ConfigError, match=match):
        sparsifier.register_layers(rules)  # type: ignore[arg-type]
    assert not sparsifier.data_groups


def test_layer_rule_needs_a_selector() -> None:
    with pytest.raises(ConfigError, match="pattern, a module_type or both"):
        LayerRule(config={"sparsity_level": 0.5})
