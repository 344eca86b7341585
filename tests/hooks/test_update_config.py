"""update_config(): change a layer's sparse_config values and keep its aggregated data."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from actsparse.hooks import ActivationSparsifier


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


BATCHES = [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _calibrated(model: nn.Module, **config: object) -> ActivationSparsifier:
    s = ActivationSparsifier(model, **config)  # type: ignore[arg-type]
    s.register_layer(model[2])
    with torch.no_grad():
        for batch in BATCHES:
            model(batch)
    return s


STATIC = {"aggregate_fn": "sum", "reduce_fn": "mean", "mask_fn": "magnitude"}


def test_a_new_level_keeps_the_data_and_step_uses_it() -> None:
    model = _model()
    s = _calibrated(model, **STATIC, sparsity_level=0.25)
    data = s.data_groups["2"]["data"].clone()
    hook = s.data_groups["2"]["hook"]
    s.update_config("2", sparsity_level=0.75)
    assert s.data_groups["2"]["sparse_config"] == {"sparsity_level": 0.75}
    assert torch.equal(s.data_groups["2"]["data"], data)
    assert s.data_groups["2"]["hook"] is hook  # the aggregate hook stays attached as it was
    s.step()
    fresh = _calibrated(copy.deepcopy(_model()), **STATIC, sparsity_level=0.75)
    fresh.step()
    assert torch.equal(s.get_mask("2"), fresh.get_mask("2"))
    assert int((s.get_mask("2") == 0).sum()) == 6


def test_keys_not_given_keep_their_values() -> None:
    model = _model()
    s = _calibrated(model, **{**STATIC, "mask_fn": "block_norm"}, sparsity_level=0.5)
    s.update_config("2", sparse_block_shape=(1, 2))
    s.update_config("2", zeros_per_block=1)
    assert s.data_groups["2"]["sparse_config"] == {
        "sparsity_level": 0.5,
        "sparse_block_shape": (1, 2),
        "zeros_per_block": 1,
    }
    s.step()
    assert s.get_mask("2").shape == (8,)


def test_the_mask_of_the_last_step_stays_until_the_next() -> None:
    model = _model()
    s = _calibrated(model, **STATIC, sparsity_level=0.25)
    s.step()
    mask = s.get_mask("2").clone()
    s.update_config("2", sparsity_level=0.5)
    assert torch.equal(s.get_mask("2"), mask)
    with torch.no_grad():
        model(BATCHES[0])
    s.step()
    assert int((s.get_mask("2") == 0).sum()) == 4  # half of the (8,) mask


def test_an_aggregate_key_may_change_once_the_data_is_stepped() -> None:
    model = _model()
    s = _calibrated(
        model,
        aggregate_fn="abs_mean",
        reduce_fn="identity",
        mask_fn="magnitude",
        sparsity_level=0.5,
    )
    s.step()  # the data is folded into the mask: nothing left for a new sample_dims to spoil
    hook = s.data_groups["2"]["hook"]
    s.update_config("2", sample_dims=[1])
    assert s.data_groups["2"]["hook"] is not hook  # the aggregate hook binds the new value
    assert list(model[2]._forward_pre_hooks) == [s.data_groups["2"]["hook"].id]
    with torch.no_grad():
        model(BATCHES[0])
    s.step()
    assert s.get_mask("2").shape == (5, 1)  # one value per row: dim 1 is now the sample dim


def test_threshold_mode_calibrates_for_the_new_target() -> None:
    model = _model()
    s = _calibrated(
        model,
        aggregate_fn="abs_histogram",
        reduce_fn="identity",
        mask_fn="target_threshold",
        sparsity_level=0.2,
    )
    s.update_config("2", sparsity_level=0.6)
    s.step()
    result = s.thresholds["2"]
    assert result.target == 0.6
    assert result.expected_sparsity == pytest.approx(0.6)


def test_the_sparse_config_copy_is_a_plain_dict_once_copied() -> None:
    model = _model()
    s = _calibrated(model, **STATIC, sparsity_level=0.25)
    shown = s.data_groups["2"]["sparse_config"]
    assert shown == {"sparsity_level": 0.25}
    for copied in (copy.copy(shown), copy.deepcopy(shown), pickle.loads(pickle.dumps(shown))):
        assert type(copied) is dict
        copied["sparsity_level"] = 0.5  # a copy of the copy is the caller's to change
    assert s.data_groups["2"]["sparse_config"] == {"sparsity_level": 0.25}
