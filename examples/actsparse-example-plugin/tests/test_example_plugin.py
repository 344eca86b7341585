"""The example plugin works by name once its distribution is installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actsparse.core import ConfigError, get_registry
from actsparse.hooks import ActivationSparsifier


def test_the_strategies_come_from_the_installed_distribution() -> None:
    registry = get_registry()
    for kind, name in (("aggregate", "active_rate"), ("mask", "keep_positive")):
        entry = registry.entry(kind, name)
        assert entry.plugin == "example"
        assert entry.distribution == "actsparse-example-plugin"


def test_end_to_end_by_name() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    s = ActivationSparsifier(model, reduce_fn="identity")
    s.register_layer(
        model[2],
        aggregate_fn="active_rate",
        mask_fn="keep_positive",
        margin=0.25,
        features=[[0, 1, 2], [5]],
        feature_dim=-1,
    )
    batches = [torch.randn(16, 8), torch.randn(3, 5, 8), torch.randn(1, 8)]
    with torch.no_grad():
        for x in batches:
            model(x)
    s.step()
    s.squash_mask()
    hidden = torch.cat([torch.relu(model[0](x)).reshape(-1, 8) for x in batches])
    rate = (hidden > 0).float().mean(0)
    masks = s.get_mask("2")
    assert torch.equal(masks[0], (rate[[0, 1, 2]] > 0.25).float())
    assert torch.equal(masks[1], (rate[[5]] > 0.25).float())


def test_its_keys_are_checked_at_registration() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    s = ActivationSparsifier(model, aggregate_fn="active_rate", reduce_fn="identity")
    with pytest.raises(ConfigError, match=r"'keep_positive'.*unknown key\(s\) 'margn'"):
        s.register_layer(model[0], mask_fn="keep_positive", margn=0.1)


def test_its_values_are_checked_at_registration() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    s = ActivationSparsifier(model, aggregate_fn="active_rate", reduce_fn="identity")
    with pytest.raises(ConfigError, match=r"'keep_positive': margin must be a number, got '0.1'"):
        s.register_layer(model[0], mask_fn="keep_positive", margin="0.1")
    assert s.data_groups == {}
