"""Threshold mode: a calibrated |x| threshold per layer, applied per input after squash_mask()."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse import serialize
from actsparse.core import ConfigError, MaskNotReadyError, SerializationError, StateError
from actsparse.hooks import (
    ActivationSparsifier,
    SparsityTargetWarning,
    ThresholdResult,
    allocate_greedy,
    layer_sensitivity,
)

Sampler = Callable[[torch.Generator, tuple[int, ...]], torch.Tensor]


def normal(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def laplace(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    u = torch.rand(shape, generator=g) - 0.5
    return -u.sign() * torch.log1p(-2 * u.abs()) * 0.7


def relu_normal(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.relu(torch.randn(shape, generator=g) + 0.3)


def make(dim: int = 64) -> tuple[nn.Sequential, ActivationSparsifier]:
    model = nn.Sequential(nn.Identity(), nn.Linear(dim, 8))
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="abs_histogram", reduce_fn="identity", mask_fn="target_threshold"
    )
    return model, sparsifier


def sparsity_after(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> float:
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return float((seen[0] == 0).double().mean())


def calibrate_and_squash(
    sampler: Sampler, level: float, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[nn.Sequential, ActivationSparsifier, torch.Generator]:
    model, sparsifier = make()
    model.to(dtype)
    sparsifier.register_layer(model[1], sparsity_level=level)
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        model(sampler(g, (32, 16, 64)).to(dtype))
    sparsifier.step()
    sparsifier.squash_mask()
    return model, sparsifier, g


@pytest.mark.parametrize("sampler", [normal, laplace, relu_normal])
@pytest.mark.parametrize("level", [0.25, 0.4, 0.5, 0.75, 0.9])
def test_threshold_hits_the_target_within_one_point(sampler: Sampler, level: float) -> None:
    if sampler is relu_normal and level < 0.39:
        pytest.skip("below the zero fraction of relu(N(0.3, 1)): the unreachable case")
    model, sparsifier, g = calibrate_and_squash(sampler, level)
    result = sparsifier.thresholds["1"]
    assert result.reachable
    assert result.expected_sparsity == pytest.approx(level)
    achieved = sparsity_after(model, model[1], sampler(g, (64, 16, 64)))
    assert abs(achieved - level) <= 0.01, (achieved, level)


@settings(max_examples=25, deadline=None)
@given(
    level=st.floats(0.05, 0.95),
    log_scale=st.floats(-12, 12),
    seed=st.integers(0, 2**16),
)
def test_threshold_is_scale_free(level: float, log_scale: float, seed: int) -> None:
    scale = 2.0**log_scale

    def scaled(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        return laplace(g, shape) * scale

    model, _sparsifier, g = calibrate_and_squash(scaled, level, seed=seed)
    achieved = sparsity_after(model, model[1], scaled(g, (32, 16, 64)))
    assert abs(achieved - level) <= 0.01, (achieved, level, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("level", [0.25, 0.5, 0.75])
def test_half_precision_inputs(dtype: torch.dtype, level: float) -> None:
    model, sparsifier, g = calibrate_and_squash(normal, level, dtype=dtype)
    x = normal(g, (64, 16, 64)).to(dtype)
    out = model[0](x)
    assert model(x).dtype == dtype
    achieved = sparsity_after(model, model[1], x)
    assert abs(achieved - level) <= 0.01, (achieved, level)
    threshold = torch.tensor(sparsifier.thresholds["1"].threshold, dtype=dtype)
    expected = out.masked_fill(out.abs() <= threshold, 0)
    seen: list[torch.Tensor] = []
    handle = model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(x)
    handle.remove()
    assert torch.equal(seen[0], expected)


def test_unreachable_target_is_reported_not_overshot_silently() -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model[1], sparsity_level=0.3)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        model(relu_normal(g, (32, 16, 64)))
    with pytest.warns(SparsityTargetWarning, match=r"'1' \(target 0.300, zeros alone 0.38"):
        sparsifier.step()
    result = sparsifier.thresholds["1"]
    assert not result.reachable
    assert result.threshold == 0.0
    assert result.target == 0.3
    assert result.expected_sparsity == result.zero_fraction
    zeros = float(torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(-0.3)))
    assert result.zero_fraction == pytest.approx(zeros, abs=0.01)
    sparsifier.squash_mask()
    x = relu_normal(g, (8, 16, 64))
    seen: list[torch.Tensor] = []
    handle = model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(x)
    handle.remove()
    assert torch.equal(seen[0], x)  # only the natural zeros, nothing more


@pytest.mark.parametrize(
    ("name", "inputs"),
    [
        ("constant", lambda g: torch.full((32, 16, 64), 0.7)),
        ("around 1e6", lambda g: 1e6 * (1 + 0.1 * torch.randn((32, 16, 64), generator=g))),
    ],
)
def test_the_expected_sparsity_is_what_the_layer_zeroes(name: str, inputs: Sampler) -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model[1], sparsity_level=0.5)
    x = inputs(torch.Generator().manual_seed(0))
    model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsifier.step()
    sparsifier.squash_mask()
    result = sparsifier.thresholds["1"]
    zeroed = sparsity_after(model, model[1], x)
    assert abs(result.expected_sparsity - zeroed) <= 0.01, (result, zeroed)
    ties = [w for w in caught if issubclass(w.category, SparsityTargetWarning)]
    if name == "constant":  # every input has one magnitude: all or none are zeroed
        assert not result.reachable
        assert len(ties) == 1
        assert "'1' (target 0.500, reached 0.000)" in str(ties[0].message)
    else:
        assert result.reachable
        assert abs(zeroed - 0.5) <= 0.01
        assert ties == []


@pytest.mark.parametrize(("zeros", "warns"), [(0.005, False), (0.03, True)])
def test_zeros_within_a_point_of_the_target_do_not_make_it_unreachable(
    zeros: float, warns: bool
) -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model[1], sparsity_level=0.0)
    g = torch.Generator().manual_seed(4)
    x = normal(g, (64, 16, 64))
    x.view(-1)[: int(zeros * x.numel())] = 0.0  # a few exact zeros, as real inputs hold
    model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsifier.step()
    result = sparsifier.thresholds["1"]
    assert result.zero_fraction == pytest.approx(zeros, abs=1e-3)
    assert result.reachable is not warns
    assert result.zeros_exceed_target is warns
    found = [w for w in caught if issubclass(w.category, SparsityTargetWarning)]
    assert len(found) == int(warns)
    if warns:
        assert "zeros alone 0.03" in str(found[0].message)


def test_reachable_target_after_relu_does_not_warn() -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model[1], sparsity_level=0.6)
    g = torch.Generator().manual_seed(2)
    model(relu_normal(g, (64, 16, 64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsifier.step()
    assert sparsifier.thresholds["1"].reachable
    assert sparsifier.thresholds["1"].threshold > 0


def test_valid_positions_exclude_padding() -> None:
    torch.manual_seed(3)
    x = torch.randn(8, 20, 64)
    lengths = torch.randint(5, 21, (8,))
    valid = torch.arange(20)[None, :] < lengths[:, None]
    padded = torch.where(valid[..., None], x, torch.zeros(()))  # padding holds zeros

    model, masked = make()
    masked.register_layer(model[1], sparsity_level=0.5)
    with masked.valid_positions(valid):
        model(padded)
    masked.step()

    model2, dense = make()
    dense.register_layer(model2[1], sparsity_level=0.5)
    model2(x[valid])  # only the real tokens
    dense.step()
    assert masked.thresholds["1"].threshold == pytest.approx(dense.thresholds["1"].threshold)
    assert masked.thresholds["1"].zero_fraction == 0.0

    model3, unmasked = make()
    unmasked.register_layer(model3[1], sparsity_level=0.5)
    model3(padded)  # without the mask the padding counts as zeros
    unmasked.step()
    assert unmasked.thresholds["1"].threshold < masked.thresholds["1"].threshold


def test_valid_positions_misuse() -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model[1], sparsity_level=0.5)
    with (
        pytest.raises(ConfigError, match="bool tensor"),
        sparsifier.valid_positions(torch.ones(2, 3)),
    ):
        pass
    with (
        pytest.raises(ConfigError, match=r"leading dimensions of its input of shape \(2, 4, 64\)"),
        sparsifier.valid_positions(torch.ones(2, 5, dtype=torch.bool)),
    ):
        model(torch.randn(2, 4, 64))
    assert "data" not in sparsifier.data_groups["1"]
    with (
        sparsifier.valid_positions(torch.ones(2, 4, dtype=torch.bool)),
        pytest.raises(ConfigError, match="do not nest"),
        sparsifier.valid_positions(torch.ones(2, 4, dtype=torch.bool)),
    ):
        pass
    # the outer block is over: no mask stays active
    model(torch.randn(3, 64))


def test_accumulator_does_not_grow_and_counts_every_position() -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model[1], sparsity_level=0.5)
    model(torch.randn(2, 64))
    size = sparsifier.data_groups["1"]["data"].shape
    model(torch.randn(7, 33, 64))
    data = sparsifier.data_groups["1"]["data"]
    assert data.shape == size
    assert int(data.sum()) == 2 * 64 + 7 * 33 * 64


def test_get_mask_and_features_in_threshold_mode() -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model[1], sparsity_level=0.5)
    model(torch.randn(4, 64))
    with pytest.raises(MaskNotReadyError, match="threshold mode"):
        sparsifier.get_mask("1")
    assert sparsifier.state["1"] == {"mask": None}
    with pytest.raises(ConfigError, match="does not take features"):
        sparsifier.register_layer(model[1], features=[0, 1], feature_dim=1, sparsity_level=0.5)
    with pytest.raises(MaskNotReadyError, match="no mask"):
        sparsifier.squash_mask()  # before step(): no threshold yet


def test_sparsify_hook_zeroes_at_and_below_the_threshold() -> None:
    model, sparsifier, _g = calibrate_and_squash(normal, 0.5)
    t = sparsifier.thresholds["1"].threshold
    x = torch.tensor([[-2 * t, -t, -t / 2, 0.0, t / 2, t, 2 * t, float("nan")]]).repeat(1, 8)
    seen: list[torch.Tensor] = []
    handle = model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(x)
    handle.remove()
    expected = torch.tensor([[-2 * t, 0, 0, 0, 0, 0, 2 * t, float("nan")]]).repeat(1, 8)
    assert torch.equal(seen[0].isnan(), expected.isnan())
    assert torch.equal(seen[0].nan_to_num(), expected.nan_to_num())


def test_sparsify_hook_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    model, _sparsifier, _g = calibrate_and_squash(normal, 0.5)
    x = torch.randn(4, 16, 64)
    eager = model(x)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert torch.allclose(torch.compile(model)(x), eager)


def _state(sparsifier: ActivationSparsifier) -> dict[str, object]:
    return {
        name: {k: v for k, v in group.items() if k not in ("layer", "hook", "data")}
        for name, group in sparsifier.data_groups.items()
    }


@pytest.mark.parametrize("point", ["registered", "aggregated", "stepped", "squashed"])
def test_state_dict_round_trip_at_every_point(point: str, tmp_path: Path) -> None:
    model, sparsifier = make()
    sparsifier.register_layer(model[1], sparsity_level=0.4)
    x = torch.randn(16, 8, 64)
    if point != "registered":
        model(x)
    if point in ("stepped", "squashed"):
        sparsifier.step()
    if point == "squashed":
        sparsifier.squash_mask()
    before = sparsifier.state_dict()
    for restore in ("memory", "safetensors", "pt"):
        model2 = nn.Sequential(nn.Identity(), nn.Linear(64, 8))
        model2.load_state_dict(model.state_dict())
        other = ActivationSparsifier(model2)
        if restore == "memory":
            other.load_state_dict(sparsifier.state_dict())
        else:
            path = serialize.save(sparsifier, tmp_path / f"s.{restore}")
            serialize.load_into(other, path)
        assert _state(other) == _state(sparsifier)
        assert other.thresholds == sparsifier.thresholds
        if point == "aggregated":
            assert torch.equal(other.data_groups["1"]["data"], sparsifier.data_groups["1"]["data"])
            model(x)
            model2(x)
            sparsifier.step()
            other.step()
            assert other.thresholds == sparsifier.thresholds
            sparsifier.load_state_dict(before)  # undo the step for the next round
        y = torch.randn(5, 64)
        if point == "squashed":
            assert torch.equal(model(y), model2(y))


def test_refuses_a_bad_threshold_in_a_state_dict() -> None:
    _model, sparsifier, _g = calibrate_and_squash(normal, 0.5)
    sd = sparsifier.state_dict()
    sd["state"]["1"]["threshold"] = {**sd["state"]["1"]["threshold"], "threshold": -1.0}
    model2 = nn.Sequential(nn.Identity(), nn.Linear(64, 8))
    other = ActivationSparsifier(model2)
    with pytest.raises(SerializationError, match="threshold must be a finite number >= 0"):
        other.load_state_dict(sd)
    del sd["state"]["1"]["threshold"]
    with pytest.raises(SerializationError, match="holds no threshold"):
        other.load_state_dict(sd)
    assert not other.data_groups
    assert not model2[1]._forward_pre_hooks


def test_threshold_result_validates_its_fields() -> None:
    with pytest.raises(ConfigError, match=r"ThresholdResult\.target"):
        ThresholdResult(0.1, 1.5, 0.5, 0.0)
    with pytest.raises(ConfigError, match=r"ThresholdResult\.threshold"):
        ThresholdResult(float("nan"), 0.5, 0.5, 0.0)


def test_retarget_moves_thresholds_without_calibrating_again() -> None:
    model, sparsifier, g = calibrate_and_squash(laplace, 0.5)
    before = sparsifier.thresholds["1"]
    sparsifier.retarget({"1": 0.8})
    after = sparsifier.thresholds["1"]
    assert after.target == 0.8
    assert after.threshold > before.threshold
    assert sparsifier.data_groups["1"]["sparse_config"] == {"sparsity_level": 0.8}
    achieved = sparsity_after(model, model[1], laplace(g, (64, 16, 64)))
    assert abs(achieved - 0.8) <= 0.01
    with pytest.raises(ConfigError, match="sparsity_level must be a number"):
        sparsifier.retarget({"1": 1.5})
    assert sparsifier.thresholds["1"] == after
    other = ActivationSparsifier(model)
    other.load_state_dict(sparsifier.state_dict())
    with pytest.raises(StateError, match="holds no calibration statistics"):
        other.retarget({"1": 0.3})


def test_greedy_allocation_spends_sparsity_where_it_costs_least() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    with torch.no_grad():
        model[1].weight.mul_(0.05)  # errors in the first layer's input are damped 20x
    dense = copy.deepcopy(model)
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="abs_histogram", reduce_fn="identity", mask_fn="target_threshold"
    )
    sparsifier.register_layers({nn.Linear: {"sparsity_level": 0.5}})
    held_out = torch.randn(256, 32)
    for _ in range(4):
        model(torch.randn(256, 32))
    sparsifier.step()
    sparsifier.squash_mask()

    def error() -> float:
        with torch.no_grad():
            return float((model(held_out) - dense(held_out)).pow(2).mean())

    table = layer_sensitivity(sparsifier, error, [0.25, 0.5, 0.75])
    assert set(table) == {"1", "2", "3"}
    assert table["1"][0.0] == 0.0
    assert sparsifier.thresholds["1"].target == 0.5  # put back
    levels = allocate_greedy(table, 0.5, dict.fromkeys(table, 1.0))
    assert sum(levels.values()) / 3 == pytest.approx(0.5)
    assert levels["1"] > max(levels["2"], levels["3"])
    sparsifier.retarget(levels)
    greedy = error()
    sparsifier.retarget(dict.fromkeys(levels, 0.5))
    assert greedy < error()
    with pytest.raises(ConfigError, match="weights must name exactly"):
        allocate_greedy(table, 0.5, {"1": 1.0})
