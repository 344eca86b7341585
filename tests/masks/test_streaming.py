"""The streaming aggregates: exact running statistics whose state does not grow."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.core import (
    AggregateStrategy,
    ConfigError,
    MaskError,
    get_registry,
    hookimpl,
    register_plugin,
    unregister_plugin,
)
from actsparse.hooks import ActivationSparsifier
from actsparse.masks import feature_axis, resolve_sample_dims

STREAMING = ("mean", "abs_mean", "sq_mean", "abs_max")

# The statistic each streaming aggregate computes, written directly over all
# samples at once (the sample dims flattened into dim 0).
DIRECT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda s: s.mean(dim=0),
    "abs_mean": lambda s: s.abs().mean(dim=0),
    "sq_mean": lambda s: (s * s).mean(dim=0),
    "abs_max": lambda s: s.abs().amax(dim=0),
}


def _fold(name: str, batches: list[torch.Tensor], **options: object) -> torch.Tensor:
    strategy = get_registry().get("aggregate", name)
    bound = strategy.bind(options)
    acc = None
    for x in batches:
        acc = bound.init(x) if acc is None else acc
        acc = bound.fn(acc, x)
    return bound.finalize(acc)  # type: ignore[no-any-return]


def _samples(batches: list[torch.Tensor], dims: tuple[int, ...]) -> torch.Tensor:
    """All samples as rows: the sample dims moved to the front and flattened."""
    rows = []
    for x in batches:
        kept = [d for d in range(x.ndim) if d not in dims]
        moved = x.permute(*dims, *kept)
        rows.append(moved.reshape(-1, *(x.shape[d] for d in kept)))
    return torch.cat(rows)


@pytest.mark.parametrize("name", STREAMING)
def test_linear_style_inputs_of_any_batch_and_length_fold_to_the_feature_dim(name: str) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 8), torch.randn(2, 11, 8), torch.randn(1, 1, 8), torch.randn(8)]
    got = _fold(name, batches)
    rows = torch.cat([b.reshape(-1, 8) for b in batches])
    assert got.shape == (8,)
    torch.testing.assert_close(got, DIRECT[name](rows))


@pytest.mark.parametrize("name", STREAMING)
def test_conv_inputs_keep_channels_and_positions(name: str) -> None:
    torch.manual_seed(1)
    batches = [torch.randn(5, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(7, 3, 4, 4)]
    got = _fold(name, batches)
    assert got.shape == (3, 4, 4)
    torch.testing.assert_close(got, DIRECT[name](torch.cat(batches)))


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    ndim=st.integers(1, 4),
    name=st.sampled_from(STREAMING),
)
def test_any_choice_of_sample_dims_matches_the_direct_statistic(
    data: st.DataObject, ndim: int, name: str
) -> None:
    shape = data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    dims = tuple(sorted(data.draw(st.sets(st.integers(0, ndim - 1)))))
    # Sample dims may vary between calls; kept dims may not.
    batches = []
    for _ in range(data.draw(st.integers(1, 3))):
        this = list(shape)
        for d in dims:
            this[d] = data.draw(st.integers(1, 4))
        batches.append(torch.randn(this, dtype=torch.float64))
    got = _fold(name, batches, sample_dims=list(dims))
    want = DIRECT[name](_samples(batches, dims))
    # Leading sample dims are dropped; later ones stay with size 1.
    lead = next((d for d in range(ndim) if d not in dims), ndim)
    assert got.shape == tuple(1 if d in dims else shape[d] for d in range(lead, ndim))
    torch.testing.assert_close(got.reshape(want.shape), want)
    # So the statistic broadcasts to every input along the right dims.
    for batch in batches:
        assert torch.broadcast_shapes(got.shape, batch.shape) == batch.shape


def test_default_sample_dims() -> None:
    assert resolve_sample_dims(1, None) == ()
    assert resolve_sample_dims(2, None) == (0,)
    assert resolve_sample_dims(3, None) == (0, 1)
    assert resolve_sample_dims(4, None) == (0,)
    assert resolve_sample_dims(5, None) == (0,)
    assert resolve_sample_dims(3, [-1, 0]) == (0, 2)
    assert resolve_sample_dims(3, 1) == (1,)


@pytest.mark.parametrize(
    ("sample_dims", "match"),
    [(3, "out of range"), ([0, -3], "twice"), ("0", "int or a list"), ([True], "int or a list")],
)
def test_bad_sample_dims(sample_dims: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_sample_dims(3, sample_dims)  # type: ignore[arg-type]


def test_feature_axis_maps_input_dims_into_the_accumulator() -> None:
    # (N, L, D): row/count axis first, then D.
    assert feature_axis(2, 3) == 1
    # (N, C, H, W) keeps C, H, W at accumulator axes 1, 2, 3.
    assert [feature_axis(d, 4) for d in (1, 2, 3)] == [1, 2, 3]
    # A sample dim after a kept one stays as a size-1 dim: (N, C, H, W) -> (C, 1, W).
    assert feature_axis(3, 4, sample_dims=[0, 2]) == 3
    assert feature_axis(2, 3, sample_dims=[0, 1]) == 1
    assert feature_axis(0, 3, sample_dims=[1, 2]) == 1
    with pytest.raises(ConfigError, match="sample dimension"):
        feature_axis(1, 3)


def test_changing_kept_dims_is_an_error_that_names_sample_dims() -> None:
    acc = _fold("mean", [torch.randn(2, 3, 8)])
    strategy = get_registry().get("aggregate", "mean")
    bound = strategy.bind({})
    raw = bound.init(torch.randn(2, 8))
    with pytest.raises(ConfigError, match="sample_dims"):
        bound.fn(raw, torch.randn(2, 9))
    assert acc.shape == (8,)
    # A batch of one whose kept dims hold as many elements in another shape
    # must not be reshaped into the accumulator.
    conv = strategy.bind({"sample_dims": [0]})
    kept = conv.init(torch.randn(2, 3, 4))
    for other in (torch.randn(1, 4, 3), torch.randn(1, 12)):
        with pytest.raises(ConfigError, match="kept dimensions of the input changed"):
            conv.fn(kept, other)
    assert torch.equal(kept, torch.zeros(2, 3, 4))


def test_half_precision_inputs_accumulate_in_float32() -> None:
    x = torch.full((3000, 4), 30.0, dtype=torch.float16)  # the sum overflows float16
    strategy = get_registry().get("aggregate", "sq_mean").bind({})
    acc = strategy.fn(strategy.init(x), x)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(strategy.finalize(acc), torch.full((4,), 900.0))


@pytest.mark.parametrize("name", STREAMING)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "sample_dims"), [((1, 5), None), ((1, 3, 1), [0, 2])])
def test_one_sample_updates_as_the_folding_path_does(
    name: str, dtype: torch.dtype, shape: tuple[int, ...], sample_dims: list[int] | None
) -> None:
    # A single sample skips the fold over size-1 dims; adding an all-zero
    # sample forces the fold and changes no sum or maximum of |x|, so row 0
    # must come out bit-identical (300 ** 2 overflows float16: squares must
    # be taken in the accumulator's type on both paths).
    strategy = get_registry().get("aggregate", name).bind({"sample_dims": sample_dims})
    x = (torch.linspace(-300, 300, torch.Size(shape).numel()).reshape(shape)).to(dtype)
    one = strategy.fn(strategy.init(x), x)
    folded = strategy.fn(strategy.init(x), torch.cat([x, torch.zeros_like(x)]))
    assert one.dtype == folded.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(one[0], folded[0])
    assert torch.equal(one[1], torch.ones_like(one[1]))
    assert torch.equal(folded[1], torch.full_like(folded[1], 2.0))


def _accumulator_bytes(aggregate: str, batch: int) -> int:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Conv2d(1, 4, 3))
    s = ActivationSparsifier(
        model, aggregate_fn=aggregate, reduce_fn="identity", mask_fn="magnitude"
    )
    s.register_layer(model[0], sparsity_level=0.5)
    with torch.no_grad():
        model[0](torch.randn(batch, 16, 64))
        model[0](torch.randn(batch, 16, 64))
    data = s.data_groups["0"]["data"]
    return int(data.nelement() * data.element_size())


@pytest.mark.parametrize("name", STREAMING)
def test_accumulator_bytes_do_not_depend_on_the_batch(name: str) -> None:
    small, large = _accumulator_bytes(name, 1), _accumulator_bytes(name, 256)
    assert small == large
    # The elementwise "sum" keeps the whole input: the measurement can tell them apart.
    assert _accumulator_bytes("sum", 256) == 256 * _accumulator_bytes("sum", 1)


def test_sample_dims_reaches_the_aggregate_and_not_the_mask() -> None:
    seen: dict[str, object] = {}

    def keep_all(data: torch.Tensor, **config: object) -> torch.Tensor:
        seen.update(config)
        return torch.ones_like(data)

    model = nn.Sequential(nn.Linear(6, 6))
    s = ActivationSparsifier(model, aggregate_fn="abs_mean", reduce_fn="identity")
    # Keep (L, D): the statistic is per position and feature.
    s.register_layer(model[0], mask_fn=keep_all, sample_dims=0, level=3)
    model(torch.randn(4, 5, 6))
    s.step()
    assert seen == {"level": 3}
    assert s.get_mask("0").shape == (5, 6)
    assert s.data_groups["0"]["sparse_config"] == {"sample_dims": 0, "level": 3}


def test_unknown_key_names_the_layer_both_strategies_and_their_keys() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    s = ActivationSparsifier(model, aggregate_fn="abs_mean", reduce_fn="identity")
    with pytest.raises(ConfigError) as info:
        s.register_layer(model[0], mask_fn="magnitude", sparsity_level=0.5, sample_dim=0)
    message = str(info.value)
    for part in ("'0'", "'magnitude'", "'abs_mean'", "'sample_dim'", "'sparsity_level'"):
        assert part in message
    assert "accepts 'sample_dims'" in message
    assert "0" not in s.data_groups
    with pytest.raises(ConfigError, match=r"missing key\(s\) 'sparsity_level'"):
        s.register_layer(model[0], mask_fn="magnitude", sample_dims=0)


def test_feature_dim_folded_by_the_aggregate_is_an_error_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    s = ActivationSparsifier(model, aggregate_fn="mean", reduce_fn="identity")
    s.register_layer(
        model[0], mask_fn="magnitude", sparsity_level=0.5, features=[0, 1], feature_dim=0
    )
    with pytest.raises(ConfigError, match=r"layer '0'.*'mean'.*feature_dim=0"):
        model(torch.randn(3, 6))


class _CountingPlugin:
    """An in-process plugin: the built-in abs_mean, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def actsparse_aggregate_strategies(self) -> list[AggregateStrategy]:
        base = get_registry().get("aggregate", "abs_mean")

        def counting(acc: torch.Tensor, x: torch.Tensor, **options: object) -> torch.Tensor:
            self.calls += 1
            return base.fn(acc, x, **options)  # type: ignore[no-any-return]

        return [attrs.evolve(base, name="counting_abs_mean", fn=counting)]


def test_features_are_aggregated_in_one_call_and_exposed_per_feature() -> None:
    plugin = _CountingPlugin()
    register_plugin(plugin, name="counting")
    try:
        model = nn.Sequential(nn.Conv2d(6, 1, 1))
        s = ActivationSparsifier(model, reduce_fn="identity", mask_fn="magnitude")
        s.register_layer(
            model[0],
            aggregate_fn="counting_abs_mean",
            sparsity_level=0.5,
            features=[[0, 2], [5]],
            feature_dim=1,
        )
        x = torch.randn(2, 6, 3, 3)
        model(x)
        model(x)
    finally:
        unregister_plugin(name="counting")
    assert plugin.calls == 2  # one per forward pass, not one per feature
    data = s.data_groups["0"]["data"]
    assert [tuple(d.shape) for d in data] == [(2, 2, 3, 3), (2, 1, 3, 3)]
    torch.testing.assert_close(data[0][0] / data[0][1], x[:, [0, 2]].abs().mean(0))
    torch.testing.assert_close(data[1][0] / data[1][1], x[:, [5]].abs().mean(0))
    s.step()
    assert [tuple(m.shape) for m in s.get_mask("0")] == [(2, 3, 3), (1, 3, 3)]


def test_step_with_a_mask_that_does_not_fit_the_statistic_stores_nothing() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    s = ActivationSparsifier(model, aggregate_fn="abs_mean", reduce_fn="identity")
    s.register_layer(model[0], mask_fn=lambda t: torch.ones(7))
    model(torch.randn(3, 6))
    before = s.data_groups["0"]["data"].clone()
    with pytest.raises(MaskError, match="does not broadcast"):
        s.step()
    assert torch.equal(s.data_groups["0"]["data"], before)


def test_conv1d_channel_statistic_masks_whole_channels() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(4, 3, 1))
    s = ActivationSparsifier(
        model, aggregate_fn="abs_mean", reduce_fn="identity", mask_fn="magnitude"
    )
    s.register_layer(model[0], sparsity_level=0.5, sample_dims=[0, 2])
    scale = torch.tensor([0.1, 5.0, 0.2, 3.0])[None, :, None]
    model(torch.randn(8, 4, 10) * scale)
    model(torch.randn(1, 4, 3) * scale)  # another length: only C is kept
    s.step()
    mask = s.get_mask("0")
    assert mask.shape == (4, 1)
    assert mask.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    s.squash_mask()
    seen: list[torch.Tensor] = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(torch.randn(2, 4, 6))
    assert bool((seen[0][:, [0, 2]] == 0).all())
    assert bool((seen[0][:, [1, 3]] != 0).all())
