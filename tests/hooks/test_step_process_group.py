"""step(process_group=...) in one process: validation, and no combining without peers."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _support import same_state
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.core import COMBINE_OPS, ConfigError
from actsparse.hooks import ActivationSparsifier
from actsparse.hooks._distributed import combine_accumulators


def _plain_sum(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return acc + x


def _calibrated(aggregate: object = _plain_sum) -> tuple[nn.Module, ActivationSparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    sparsifier = ActivationSparsifier(
        model, aggregate_fn=aggregate, reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model[0])
    sparsifier.register_layer(model[2], features=[0, [2, 4]], feature_dim=1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 6))
    return model, sparsifier


def _snapshot(sparsifier: ActivationSparsifier) -> list[object]:
    out: list[object] = []
    for name, group in sparsifier.data_groups.items():
        data = group["data"]
        out.append((name, [d.clone() for d in data] if isinstance(data, list) else data.clone()))
        mask = sparsifier.state[name]["mask"]
        out.append([m.clone() for m in mask] if isinstance(mask, list) else mask.clone())
    return out


@pytest.mark.parametrize("bad", [True, "world", 0, object()], ids=repr)
def test_a_bad_process_group_is_refused_and_changes_nothing(bad: object) -> None:
    _, sparsifier = _calibrated("sum")
    before = _snapshot(sparsifier)
    with pytest.raises(ConfigError, match="process_group must be None"):
        sparsifier.step(process_group=bad)
    assert same_state(before, _snapshot(sparsifier))


@pytest.mark.parametrize("process_group", [None, False])
def test_without_torch_distributed_step_runs_locally(process_group: object) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    _, default = _calibrated()
    default.step(process_group=process_group)
    _, plain = _calibrated()
    plain.step()
    for name in plain.data_groups:
        assert same_state(default.get_mask(name), plain.get_mask(name))


def test_a_group_of_one_needs_no_combine(group_of_one: None) -> None:
    # A plain callable cannot be combined, but with one process there is nothing to combine.
    _, sparsifier = _calibrated()
    sparsifier.step()
    _, again = _calibrated()
    again.step(process_group=dist.new_group([0]))
    for name in sparsifier.data_groups:
        assert same_state(sparsifier.get_mask(name), again.get_mask(name))


# ------------------------------------------------- the bucketing bookkeeping


_DTYPES = [torch.float32, torch.float64, torch.int64]


@st.composite
def _fake_layers(draw: st.DrawFn) -> dict[str, Any]:
    """Layers with accumulators of random shapes, dtypes, structures and combine specs."""
    layers = {}
    for i in range(draw(st.integers(1, 5))):
        rows = draw(st.integers(1, 3))
        spec: Any = draw(
            st.one_of(
                st.sampled_from(COMBINE_OPS),
                st.lists(st.sampled_from(COMBINE_OPS), min_size=rows, max_size=rows).map(tuple),
            )
        )
        parts = []
        for _ in range(draw(st.integers(1, 3))):
            shape = (rows, *draw(st.lists(st.integers(0, 3), max_size=2)))
            dtype = draw(st.sampled_from(_DTYPES))
            parts.append(torch.arange(math.prod(shape)).reshape(shape).to(dtype) + 100 * i)
        listed = len(parts) > 1 or draw(st.booleans())
        layers[f"layer{draw(st.integers(0, 99))}_{i}"] = SimpleNamespace(
            name=f"layer{i}",
            combine=spec,
            data=parts if listed else parts[0],
            aggregate=SimpleNamespace(name="agg", elementwise=False),
        )
    return layers


@settings(max_examples=40, deadline=None)
@given(layers=_fake_layers())
def test_combining_over_one_process_gives_back_every_accumulator(
    module_group_of_one: None, layers: dict[str, Any]
) -> None:
    before = {name: copy.deepcopy(layer.data) for name, layer in layers.items()}
    combined = combine_accumulators(layers, dist.group.WORLD, None)
    assert combined.keys() == layers.keys()
    for name, layer in layers.items():
        assert same_state(combined[name], layer.data)
        assert type(combined[name]) is type(layer.data)
        parts = combined[name] if isinstance(combined[name], list) else [combined[name]]
        originals = layer.data if isinstance(layer.data, list) else [layer.data]
        for got, original in zip(parts, originals, strict=True):
            assert got.dtype == original.dtype
            # new tensors: the stored accumulators are never written
            assert got.data_ptr() != original.data_ptr() or original.numel() == 0
        assert same_state(before[name], layer.data)
