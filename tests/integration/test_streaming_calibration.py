"""Calibration on batches of different shapes, with streaming aggregates.

torch.ao's accumulator has the input's full shape, so a last batch of another
size or a sequence of another length crashes it. A streaming aggregate folds
the sample dims on every call: its mask equals the mask from one batch that
holds every sample.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actsparse.hooks import ActivationSparsifier

STREAMING = ("mean", "abs_mean", "sq_mean", "abs_max")


class MLPBlock(nn.Module):
    """A transformer MLP block: pre-norm, 384 -> 1536 -> 384, residual."""

    def __init__(self, width: int = 384) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.down(self.act(self.up(self.norm(x))))
        return out


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        out: torch.Tensor = self.fc(self.pool(x).flatten(1))
        return out


def _calibrate(
    model: nn.Module, layers: list[str], aggregate: str, batches: list[torch.Tensor]
) -> ActivationSparsifier:
    s = ActivationSparsifier(
        model, aggregate_fn=aggregate, reduce_fn="identity", mask_fn="magnitude"
    )
    for name in layers:
        s.register_layer(model.get_submodule(name), sparsity_level=0.5)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return s


def _statistic(s: ActivationSparsifier, name: str, aggregate: str) -> torch.Tensor:
    """The finalized statistic, read from the (2, *kept) accumulator: sum/count or max."""
    data = s.data_groups[name]["data"]
    return data[0] if aggregate == "abs_max" else data[0] / data[1]  # type: ignore[no-any-return]


def _check_same_masks(
    model: nn.Module, layers: list[str], aggregate: str, batches: list[torch.Tensor]
) -> None:
    width = batches[0].shape[-1]
    if batches[0].ndim == 4:
        together = torch.cat(batches)
    else:  # sequences of different lengths: one batch of every token
        together = torch.cat([b.reshape(-1, width) for b in batches])
    streamed = _calibrate(model, layers, aggregate, batches)
    single = _calibrate(model, layers, aggregate, [together])
    for name in layers:
        torch.testing.assert_close(
            _statistic(streamed, name, aggregate), _statistic(single, name, aggregate)
        )
    streamed.step()
    single.step()
    for name in layers:
        mask = streamed.get_mask(name)
        assert torch.equal(mask, single.get_mask(name)), name
        assert mask.sum() == mask.numel() // 2


@pytest.mark.parametrize("aggregate", STREAMING)
def test_transformer_mlp_block_on_batches_of_different_shapes(aggregate: str) -> None:
    torch.manual_seed(0)
    model = MLPBlock()
    batches = [torch.randn(32, 7, 384), torch.randn(5, 128, 384), torch.randn(1, 1, 384)]
    _check_same_masks(model, ["up", "down"], aggregate, batches)


@pytest.mark.parametrize("aggregate", STREAMING)
def test_cnn_on_batches_of_different_sizes(aggregate: str) -> None:
    torch.manual_seed(1)
    model = CNN()
    batches = [torch.randn(32, 3, 12, 12), torch.randn(5, 3, 12, 12), torch.randn(1, 3, 12, 12)]
    _check_same_masks(model, ["conv1", "conv2", "fc"], aggregate, batches)


def test_the_cnn_masks_keep_channels_and_positions_and_apply_to_any_batch() -> None:
    torch.manual_seed(2)
    model = CNN()
    batches = [torch.randn(4, 3, 12, 12), torch.randn(1, 3, 12, 12)]
    s = _calibrate(model, ["conv2", "fc"], "abs_mean", batches)
    s.step()
    assert s.get_mask("conv2").shape == (8, 10, 10)
    assert s.get_mask("fc").shape == (32,)
    s.squash_mask()
    seen: list[torch.Tensor] = []
    model.fc.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(torch.randn(3, 3, 12, 12))
    assert seen[0].shape == (3, 32)
    assert bool((seen[0][:, s.get_mask("fc") == 0] == 0).all())


@pytest.mark.parametrize("features", [None, [[0, 5, 9], [100], [383, 7]]])
def test_resuming_from_a_state_dict_mid_calibration_gives_identical_masks(
    features: list[list[int]] | None,
) -> None:
    torch.manual_seed(3)
    batches = [torch.randn(8, 7, 384), torch.randn(2, 30, 384), torch.randn(1, 1, 384)]
    extra = {} if features is None else {"features": features, "feature_dim": -1}

    def start(model: nn.Module) -> ActivationSparsifier:
        s = ActivationSparsifier(
            model, aggregate_fn="sq_mean", reduce_fn="identity", mask_fn="magnitude"
        )
        s.register_layer(model.up, sparsity_level=0.3, **extra)
        s.register_layer(model.down, sparsity_level=0.6, **extra)
        return s

    model = MLPBlock()
    straight = start(model)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    straight.step()

    first = start(model)
    with torch.no_grad():
        model(batches[0])
    sd = first.state_dict()
    first.unregister_layer("up")
    first.unregister_layer("down")

    fresh = MLPBlock()
    fresh.load_state_dict(model.state_dict())
    resumed = start(fresh)
    resumed.load_state_dict(sd)
    with torch.no_grad():
        for batch in batches[1:]:
            fresh(batch)
    resumed.step()
    for name in ("up", "down"):
        want, got = straight.get_mask(name), resumed.get_mask(name)
        if features is None:
            assert torch.equal(want, got)
        else:
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_a_state_dict_taken_after_calibration_steps_to_the_same_masks() -> None:
    torch.manual_seed(4)
    model = CNN()
    batches = [torch.randn(6, 3, 12, 12), torch.randn(1, 3, 12, 12)]

    def start(model: nn.Module) -> ActivationSparsifier:
        s = ActivationSparsifier(
            model, aggregate_fn="abs_max", reduce_fn="identity", mask_fn="magnitude"
        )
        s.register_layer(model.conv2, sparsity_level=0.5, features=[[0, 3], [7]], feature_dim=1)
        s.register_layer(model.fc, sparsity_level=0.25)
        return s

    original = start(model)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    sd = original.state_dict()
    original.step()
    fresh = CNN()
    restored = start(fresh)
    restored.load_state_dict(sd)
    restored.step()  # no input since the restore: the per-feature data is used as it is
    assert torch.equal(restored.get_mask("fc"), original.get_mask("fc"))
    for got, want in zip(restored.get_mask("conv2"), original.get_mask("conv2"), strict=True):
        assert got.shape == want.shape
        assert torch.equal(got, want)
