"""ActivationSparsifier.fold(): masks baked into weights, zeroed inputs pruned.

Every test compares the folded model with the hooked (squashed) model it came
from, on inputs it has not seen.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from _seed import run_seed_workflow
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.core import ConfigError
from actsparse.hooks import ActivationSparsifier, PrunedConv2d, PrunedLinear


def per_feature_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean |x| over every dimension but the last: one value per input feature."""
    return t.abs().flatten(0, -2).mean(0)


def per_channel_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean |x| per channel of an (N, C, H, W) input, shaped (C, 1, 1)."""
    return t.abs().mean(dim=(0, 2, 3)).view(-1, 1, 1)


class MLP(nn.Module):
    def __init__(self, width: int = 12, hidden: int = 20, *, residual: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        out: torch.Tensor = self.down(self.act(h))
        if self.residual:  # the producer's output has a second reader
            out = out + h.sum(-1, keepdim=True)
        return out


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv2(self.relu(self.conv1(x)))
        return out


def squashed(
    model: nn.Module,
    layers: list[nn.Module],
    make_input: Callable[[], torch.Tensor],
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] = per_feature_mean,
    level: float = 0.5,
    **register: object,
) -> ActivationSparsifier:
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn=reduce_fn, mask_fn="magnitude", sparsity_level=level
    )
    for layer in layers:
        sparsifier.register_layer(layer, **register)
    with torch.no_grad():
        for _ in range(2):
            model(make_input())
    sparsifier.step()
    sparsifier.squash_mask()
    return sparsifier


def assert_same_outputs(
    reference: nn.Module, folded: nn.Module, make_input: Callable[[], torch.Tensor]
) -> None:
    with torch.no_grad():
        for _ in range(3):
            x = make_input()
            torch.testing.assert_close(folded(x), reference(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(2, 10),
    hidden=st.integers(2, 24),
    level=st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]),
    residual=st.booleans(),
    prune=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_linear_matches_hooked_model(
    width: int, hidden: int, level: float, residual: bool, prune: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = MLP(width, hidden, residual=residual).eval()

    def make_input() -> torch.Tensor:
        return torch.randn(3, 5, width)

    sparsifier = squashed(model, [model.down], make_input, level=level)
    mask = sparsifier.get_mask("down")
    hooked = copy.deepcopy(model)
    assert sparsifier.fold(prune=prune) == ["down"]
    assert_same_outputs(hooked, model, make_input)
    assert not model.down._forward_pre_hooks
    kept = int((mask != 0).sum())
    if prune and kept < hidden:
        assert model.down.in_features == kept
        if residual:  # the producer is read twice: the layer gathers instead
            assert isinstance(model.down, PrunedLinear)
            assert model.up.out_features == hidden
        else:  # the producer loses the rows nobody reads
            assert type(model.down) is nn.Linear
            assert model.up.out_features == kept
    else:
        assert type(model.down) is nn.Linear
        assert model.down.in_features == hidden
        assert model.up.out_features == hidden


def test_fold_removes_the_multiply_adds_of_pruned_features() -> None:
    torch.manual_seed(0)
    model = MLP(16, 64).eval()
    sparsifier = squashed(model, [model.down], lambda: torch.randn(4, 16), level=0.5)
    dense = sum(p.numel() for p in model.parameters())
    sparsifier.fold(prune=True)
    # half of up's rows (weight and bias) and half of down's columns are gone
    assert sum(p.numel() for p in model.parameters()) == dense - 32 * 16 - 32 - 32 * 16


def test_fold_unregisters_folded_layers_and_keeps_the_others() -> None:
    torch.manual_seed(1)
    model = MLP(6, 10).eval()

    def make_input() -> torch.Tensor:
        return torch.randn(4, 6)

    sparsifier = squashed(model, [model.up, model.act], make_input, reduce_fn=lambda t: t.mean(0))
    sparsifier.register_layer(model.down)  # still calibrating: not foldable
    hooked = copy.deepcopy(model)
    assert sparsifier.fold(prune=True) == ["up"]  # act is no Linear/Conv
    assert sparsifier.folded == ("up",)
    assert list(sparsifier.data_groups) == ["act", "down"]
    assert list(sparsifier.state) == ["act", "down"]
    assert model.act._forward_pre_hooks  # its sparsify hook stays
    assert sparsifier.data_groups["down"]["hook_state"] == "aggregate"
    with torch.no_grad():
        x = make_input()
        torch.testing.assert_close(model(x), hooked(x))
    assert sparsifier.fold() == []
    assert sparsifier.folded == ("up",)


def test_fold_leaves_masks_that_vary_along_other_dimensions() -> None:
    torch.manual_seed(2)
    model = MLP(6, 10).eval()
    # the seed's reduce (mean over dim 0) of a (4, 5, 6) input varies along dim 1
    sparsifier = squashed(model, [model.up], lambda: torch.randn(4, 5, 6), lambda t: t.mean(0))
    assert sparsifier.get_mask("up").shape == (5, 6)
    assert sparsifier.fold(prune=True) == []
    assert list(sparsifier.data_groups) == ["up"]
    assert model.up._forward_pre_hooks


def test_fold_conv_per_channel_masks() -> None:
    torch.manual_seed(3)
    model = ConvNet().eval()

    def make_input() -> torch.Tensor:
        return torch.randn(2, 3, 9, 9)

    sparsifier = squashed(
        model, [model.conv1, model.conv2], make_input, reduce_fn=per_channel_mean, level=0.5
    )
    hooked = copy.deepcopy(model)
    assert sparsifier.fold(prune=True) == ["conv1", "conv2"]
    assert_same_outputs(hooked, model, make_input)
    # conv1 reads the model input: it gathers; conv2 shrinks conv1's output channels
    assert isinstance(model.conv1, PrunedConv2d)
    assert model.conv1.in_channels == 1  # round(0.5 * 3) = 2 channels zeroed -> 1 kept
    assert model.conv1.out_channels == 4
    assert type(model.conv2) is nn.Conv2d
    assert model.conv2.in_channels == 4
    # unbatched inputs still work
    with torch.no_grad():
        x = torch.randn(3, 9, 9)
        torch.testing.assert_close(model(x), hooked(x), rtol=1e-5, atol=1e-5)


def test_fold_seed_workflow_folds_the_linear_with_last_dim_features() -> None:
    model, sparsifier = run_seed_workflow(batches=2, batch_size=4)
    hooked = copy.deepcopy(model)
    # conv1's mask varies over pixels and identities are no Linear/Conv
    assert sparsifier.fold(prune=True) == ["linear1"]
    assert list(sparsifier.data_groups) == ["conv1", "identity1", "identity2"]
    assert "linear1" not in sparsifier.state_dict()["state"]
    assert_same_outputs(hooked, model, lambda: torch.randn(4, 1, 28, 28))


def test_fold_feature_dim_other_than_the_input_features() -> None:
    torch.manual_seed(4)
    model = MLP(6, 10).eval()
    sparsifier = squashed(
        model,
        [model.up],
        lambda: torch.randn(4, 5, 6),
        reduce_fn=lambda t: t.mean(0),
        features=[0, 2],
        feature_dim=1,
    )
    assert sparsifier.fold(prune=True) == []


def test_fold_does_not_prune_a_layer_that_carries_other_hooks() -> None:
    torch.manual_seed(5)
    model = MLP(6, 10).eval()
    sparsifier = squashed(model, [model.down], lambda: torch.randn(4, 6))
    seen: list[tuple[int, ...]] = []
    model.down.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    hooked = copy.deepcopy(model)
    assert sparsifier.fold(prune=True) == ["down"]
    assert type(model.down) is nn.Linear
    assert model.down.in_features == 10
    assert model.up.out_features == 10
    assert_same_outputs(hooked, model, lambda: torch.randn(4, 6))
    assert seen[-1] == (4, 10)


def test_fold_rejects_a_non_bool_prune_and_changes_nothing() -> None:
    torch.manual_seed(6)
    model = MLP(6, 10).eval()
    sparsifier = squashed(model, [model.down], lambda: torch.randn(4, 6))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="prune"):
        sparsifier.fold(prune="yes")  # type: ignore[arg-type]
    assert list(sparsifier.data_groups) == ["down"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_fold_after_load_state_dict_needs_one_forward_for_feature_layers() -> None:
    model, sparsifier = run_seed_workflow(batches=2, batch_size=4)
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        module._forward_pre_hooks.clear()
    restored = ActivationSparsifier(fresh)
    restored.load_state_dict(sparsifier.state_dict())
    assert restored.fold() == []  # linear1's input rank is not known yet
    with torch.no_grad():
        fresh(torch.randn(2, 1, 28, 28))
    hooked = copy.deepcopy(fresh)
    assert restored.fold(prune=True) == ["linear1"]
    assert_same_outputs(hooked, fresh, lambda: torch.randn(4, 1, 28, 28))
