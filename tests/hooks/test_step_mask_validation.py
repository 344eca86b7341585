"""step() refuses a mask that is not binary, holds NaN or does not fit the input.

The error names the layer and the mask strategy, and nothing is stored: every
layer keeps its previous mask and its aggregated data.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from actsparse.core import MaskError, MaskStrategy, hookimpl, register_plugin, unregister_plugin
from actsparse.hooks import ActivationSparsifier

BAD_MASKS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "wrong_shape": (lambda t: torch.ones(t.shape[-1] + 1), "does not broadcast"),
    "extra_dims": (lambda t: torch.ones(2, 1, *t.shape), "does not broadcast"),
    "twos": (lambda t: torch.full_like(t, 2.0), "values other than 0 and 1"),
    "halves": (lambda t: (t.abs() > 0.5).to(t.dtype) * 0.5, "values other than 0 and 1"),
    "nan": (lambda t: torch.where(t > 0, torch.nan, 1.0), "NaN"),
    "not_a_tensor": (lambda t: [1.0] * t.shape[-1], "not a tensor"),
}


class _BadMasks:
    @hookimpl
    def actsparse_mask_strategies(self) -> list[MaskStrategy]:
        return [
            MaskStrategy(name=f"bad_{key}", fn=fn, params=()) for key, (fn, _) in BAD_MASKS.items()
        ]


@pytest.fixture(scope="module", autouse=True)
def _bad_masks() -> object:
    register_plugin(_BadMasks(), name="bad_masks")
    yield
    unregister_plugin(name="bad_masks")


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))


@pytest.mark.parametrize("aggregate", ["sum", "abs_mean"])
@pytest.mark.parametrize("key", list(BAD_MASKS))
def test_a_bad_mask_is_refused_naming_layer_and_strategy(aggregate: str, key: str) -> None:
    model = _model()
    reduce = "mean" if aggregate == "sum" else "identity"
    s = ActivationSparsifier(model, aggregate_fn=aggregate, reduce_fn=reduce)
    s.register_layer(model[0], mask_fn="magnitude", sparsity_level=0.5)
    s.register_layer(model[2], mask_fn=f"bad_{key}")
    torch.manual_seed(0)
    model(torch.randn(3, 5, 6))
    masks_before = {name: s.get_mask(name).clone() for name in ("0", "2")}
    data_before = {name: s.data_groups[name]["data"].clone() for name in ("0", "2")}
    with pytest.raises(MaskError, match=rf"layer '2'.*'bad_{key}'.*{BAD_MASKS[key][1]}"):
        s.step()
    for name in ("0", "2"):
        assert torch.equal(s.get_mask(name), masks_before[name])
        assert torch.equal(s.data_groups[name]["data"], data_before[name])


def test_a_bad_mask_for_one_feature_names_the_feature() -> None:
    model = _model()
    s = ActivationSparsifier(model, aggregate_fn="abs_mean", reduce_fn="identity")
    s.register_layer(model[2], mask_fn="bad_twos", features=[0, [1, 2]], feature_dim=-1)
    model(torch.randn(3, 6))
    with pytest.raises(MaskError, match=r"layer '2', features\[0\]: mask strategy 'bad_twos'"):
        s.step()
    assert "data" in s.data_groups["2"]


@pytest.mark.parametrize(
    "mask_fn",
    [
        lambda t: (t > 0).float(),  # the statistic's own shape
        lambda t: torch.ones(1, t.shape[-1]),  # a leading 1 broadcasts
        lambda t: t > 0,  # bool masks are binary by type
        lambda t: torch.zeros(()),  # a scalar broadcasts to anything
    ],
)
def test_masks_that_fit_are_stored(mask_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    model = _model()
    s = ActivationSparsifier(model, aggregate_fn="abs_mean", reduce_fn="identity")
    s.register_layer(model[2], mask_fn=mask_fn)
    model(torch.randn(3, 6))
    s.step()
    assert "data" not in s.data_groups["2"]
    s.squash_mask()
    assert model(torch.randn(2, 6)).shape == (2, 4)
