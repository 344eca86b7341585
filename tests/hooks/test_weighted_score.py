"""The weight-aware score: ``weighted_threshold`` thresholds ``|x_i| * ||W[:, i]||``.

Calibration, retargeting, state dicts and state files work on the score (the
kernels and torch.compile: tests/hooks/test_compensation.py); the plain ``|x|``
score stays ``target_threshold``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import _thresholds as shared
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.core import ConfigError, MaskError, MaskStrategy, get_registry
from actsparse.hooks import ActivationSparsifier
from actsparse.masks import column_norm, target_threshold


def mlp(seed: int = 0) -> nn.Sequential:
    return shared.mlp(seed, 24, spread=True)


data = shared.data


def calibrated(
    model: nn.Sequential, mask_fn: str = "weighted_threshold", level: float = 0.5
) -> ActivationSparsifier:
    return shared.calibrated(model, mask_fn=mask_fn, level=level)


def test_the_zeroed_entries_are_those_whose_score_is_at_or_below_the_threshold() -> None:
    model = mlp()
    sparsifier = calibrated(model)
    threshold = sparsifier.thresholds["2"].threshold
    x = data(seed=7, batches=1)[0]
    with torch.no_grad():
        raw = model[1](model[0](x))
    score = raw.abs() * model[2].weight.norm(dim=0)
    far = (score - threshold).abs() > 1e-4 * threshold  # away from rounding at the boundary
    got = shared.seen_input(model, x)
    assert torch.equal((got == 0)[far], (score <= threshold)[far])
    assert torch.equal(got[got != 0], raw[got != 0])
    assert abs(float((got == 0).float().mean()) - 0.5) < 0.1


def test_calibration_sees_the_score_as_an_abs_histogram_of_x_times_the_scale() -> None:
    # Differential: the weighted layer's threshold equals the plain threshold of a
    # layer fed x * ||W[:, i]|| by hand.
    model = mlp()
    weighted = calibrated(model).thresholds["2"]
    plain_model = mlp()
    scale = column_norm(plain_model[2])
    plain = ActivationSparsifier(
        plain_model,
        aggregate_fn="abs_histogram",
        reduce_fn="identity",
        mask_fn="target_threshold",
        sparsity_level=0.5,
    )
    plain.register_layer(plain_model[2])
    with torch.no_grad():
        for x in data():
            plain_model[2](plain_model[1](plain_model[0](x)) * scale)
    plain.step()
    assert plain.thresholds["2"] == weighted
    assert calibrated(mlp(), "target_threshold").thresholds["2"] != weighted


def test_the_scores_differ_from_the_magnitudes_at_equal_sparsity() -> None:
    x = data(seed=3, batches=1)[0]
    weighted_model, plain_model = mlp(), mlp()
    calibrated(weighted_model)
    calibrated(plain_model, "target_threshold")
    a, b = shared.seen_input(weighted_model, x) == 0, shared.seen_input(plain_model, x) == 0
    assert not torch.equal(a, b)
    assert abs(float(a.float().mean()) - float(b.float().mean())) < 0.1


def test_retarget_moves_the_threshold_of_the_score() -> None:
    model = mlp()
    sparsifier = calibrated(model)
    x = data(seed=5, batches=1)[0]
    before = float((shared.seen_input(model, x) == 0).float().mean())
    sparsifier.retarget({"2": 0.8})
    after = float((shared.seen_input(model, x) == 0).float().mean())
    assert sparsifier.thresholds["2"].target == 0.8
    assert after > before + 0.15


def test_state_dict_and_state_files_keep_the_weighted_layer(tmp_path: Path) -> None:
    serialize = pytest.importorskip("actsparse.serialize")
    model = mlp()
    sparsifier = calibrated(model)
    x = data(seed=9, batches=1)[0]
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "weighted.safetensors"
    serialize.save(sparsifier, path)

    fresh = mlp()
    restored = ActivationSparsifier(fresh)
    serialize.load_into(restored, path)
    assert restored.data_groups["2"]["mask_fn"] == "weighted_threshold"
    assert restored.thresholds == sparsifier.thresholds
    with torch.no_grad():
        assert torch.equal(fresh(x), want)

    again = ActivationSparsifier(mlp())
    again.load_state_dict(sparsifier.state_dict())
    assert again.thresholds == sparsifier.thresholds


def test_a_layer_without_a_two_dimensional_weight_is_refused_at_registration() -> None:
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.Linear(4, 4))
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="abs_histogram", reduce_fn="identity", mask_fn="weighted_threshold"
    )
    with pytest.raises(ConfigError, match=r"layer '0'.*weighted_threshold.*Conv1d.*2-D weight"):
        sparsifier.register_layer(model[0], sparsity_level=0.5)
    assert sparsifier.data_groups == {}
    assert not model[0]._forward_pre_hooks


def test_an_input_of_another_width_is_refused_naming_the_layer() -> None:
    model = mlp()
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="abs_histogram", reduce_fn="identity", mask_fn="weighted_threshold"
    )
    model[2].weight = nn.Parameter(torch.randn(6, 30))  # 30 columns, 24 inputs
    sparsifier.register_layer(model[2], sparsity_level=0.5)
    with pytest.raises(ConfigError, match=r"layer '2'.*scores 30 input features.*\(3, 24\)"):
        model(torch.randn(3, 8))


@pytest.mark.parametrize(
    ("scale", "match"),
    [
        (lambda m: torch.ones(2, 2), "1-D floating tensor"),
        (lambda m: torch.ones(4, dtype=torch.long), "1-D floating tensor"),
        (lambda m: "nope", "got str"),
        (lambda m: -torch.ones(4), "negative or non-finite"),
        (lambda m: torch.full((4,), float("nan")), "negative or non-finite"),
    ],
)
def test_a_bad_scale_is_a_mask_error_at_registration(scale: object, match: str) -> None:
    strategy = MaskStrategy(
        name="bad_scale",
        fn=target_threshold,
        params={"sparsity_level"},
        dynamic=True,
        target_key="sparsity_level",
        scale=scale,  # type: ignore[arg-type]
    )
    model = nn.Sequential(nn.Linear(4, 4))
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="abs_histogram", reduce_fn="identity", mask_fn=strategy
    )
    with pytest.raises(MaskError, match=match):
        sparsifier.register_layer(model[0], sparsity_level=0.5)
    assert sparsifier.data_groups == {}


def test_a_scale_needs_a_dynamic_strategy() -> None:
    with pytest.raises(ConfigError, match=r"MaskStrategy\.scale is only meaningful"):
        MaskStrategy(name="static_scaled", fn=lambda d: d, scale=column_norm)
    with pytest.raises(ConfigError, match=r"MaskStrategy\.scale must be callable"):
        MaskStrategy(
            name="x",
            fn=target_threshold,
            dynamic=True,
            scale=3,  # type: ignore[arg-type]
        )


def test_the_weighted_strategy_is_registered_by_actsparse_masks() -> None:
    entry = next(e for e in get_registry().entries("mask") if e.record.name == "weighted_threshold")
    assert entry.distribution == "actsparse-masks"
    assert entry.record.scale is column_norm
    assert get_registry().get("mask", "target_threshold").scale is None


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    level=st.floats(0.05, 0.95),
    dead=st.integers(0, 3),
)
def test_every_zero_has_a_score_at_or_below_the_threshold(
    seed: int, level: float, dead: int
) -> None:
    model = mlp(seed)
    with torch.no_grad():  # columns of zero weight: their inputs are never needed
        model[2].weight[:, :dead] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsifier = calibrated(model, level=level)
    threshold = sparsifier.thresholds["2"].threshold
    x = data(seed=seed + 1, batches=1)[0]
    with torch.no_grad():
        raw = model[1](model[0](x))
    score = raw.abs() * column_norm(model[2])
    got = shared.seen_input(model, x)
    zeroed = got == 0
    slack = 1e-5 * max(threshold, 1e-30)
    assert bool((score[zeroed & (raw != 0)] <= threshold + slack).all())
    assert bool((score[~zeroed] > threshold - slack).all())
    assert bool(zeroed[:, :dead].all())
