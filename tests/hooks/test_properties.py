"""Property tests over random models, configurations and data.

- A squashed layer computes exactly the layer applied to its masked input.
- A state dict taken at any point of the workflow and loaded into a fresh
  model makes it behave like the original from then on.
- Masks are binary, zero exactly ``round(sparsity_level * n)`` entries, and
  those entries are the smallest magnitudes of the reduced data.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.hooks import ActivationSparsifier

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@attrs.frozen
class LayerPlan:
    index: int  # position of the Linear layer in the Sequential
    groups: tuple[tuple[int, ...], ...] | None  # features, or None for the whole input
    feature_dim: int
    sparsity_level: float

    def register(self, sparsifier: ActivationSparsifier, model: nn.Sequential) -> None:
        extra: dict[str, Any] = {"sparsity_level": self.sparsity_level}
        if self.groups is not None:
            extra["features"] = [g[0] if len(g) == 1 else list(g) for g in self.groups]
            extra["feature_dim"] = self.feature_dim
        sparsifier.register_layer(model[self.index], **extra)


@attrs.frozen
class Plan:
    widths: tuple[int, ...]
    seq: int | None  # an extra sequence dimension between batch and features
    batch: int
    batches: int
    layers: tuple[LayerPlan, ...]
    seed: int

    def model(self) -> nn.Sequential:
        torch.manual_seed(self.seed)
        parts: list[nn.Module] = []
        for w_in, w_out in zip(self.widths, self.widths[1:], strict=False):
            parts += [nn.Linear(w_in, w_out), nn.Tanh()]
        return nn.Sequential(*parts)

    def inputs(self, count: int, offset: int = 0) -> list[torch.Tensor]:
        shape = (self.batch, *((self.seq,) if self.seq else ()), self.widths[0])
        gen = torch.Generator().manual_seed(self.seed + 1000 * (offset + 1))
        return [torch.randn(shape, generator=gen) for _ in range(count)]

    def sparsifier(self, model: nn.Sequential) -> ActivationSparsifier:
        s = ActivationSparsifier(model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude")
        for layer in self.layers:
            layer.register(s, model)
        return s


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    widths = tuple(draw(st.lists(st.integers(1, 7), min_size=2, max_size=4)))
    seq = draw(st.none() | st.integers(1, 3))
    ndim = 3 if seq else 2
    n_linear = len(widths) - 1
    chosen = draw(st.lists(st.integers(0, n_linear - 1), min_size=1, unique=True))
    layers = []
    for k in sorted(chosen):
        width = widths[k]
        level = draw(st.floats(0.0, 1.0))
        groups = None
        if draw(st.booleans()):
            indices = draw(st.permutations(range(width)))
            used = indices[: draw(st.integers(1, width))]
            cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(used) - 1)), max_size=3))))
            bounds = [0, *(c for c in cuts if c < len(used)), len(used)]
            groups = tuple(tuple(used[a:b]) for a, b in itertools.pairwise(bounds))
        feature_dim = draw(st.sampled_from([ndim - 1, -1]))
        layers.append(LayerPlan(2 * k, groups, feature_dim, level))
    return Plan(
        widths=widths,
        seq=seq,
        batch=draw(st.integers(1, 4)),
        batches=draw(st.integers(1, 3)),
        layers=tuple(layers),
        seed=draw(st.integers(0, 2**16)),
    )


def _as_list(mask: Any) -> list[torch.Tensor]:
    return list(mask) if isinstance(mask, list) else [mask]


def _layer_inputs(model: nn.Sequential, index: int, xs: list[torch.Tensor]) -> torch.Tensor:
    """The sum over batches of what layer ``index`` sees, computed without hooks."""
    with torch.no_grad():
        total = torch.zeros(())
        for x in xs:
            h = x
            for module in list(model)[:index]:
                h = module.forward(h)
            total = total + h
    return total


def _masked(x: torch.Tensor, layer: LayerPlan, mask: Any) -> torch.Tensor:
    if layer.groups is None:
        return x * torch.as_tensor(mask)
    out = x.clone()
    for group, m in zip(layer.groups, mask, strict=True):
        index = torch.tensor(group)
        part = x.index_select(layer.feature_dim, index) * m
        out.index_copy_(layer.feature_dim % x.ndim, index, part)
    return out


@SETTINGS
@given(plans())
def test_a_squashed_layer_computes_the_layer_on_the_masked_input(plan: Plan) -> None:
    model = plan.model()
    s = plan.sparsifier(model)
    for x in plan.inputs(plan.batches):
        model(x)
    s.step()
    s.squash_mask()
    x = plan.inputs(1, offset=7)[0]
    hidden = x
    for position, module in enumerate(model):
        planned = [p for p in plan.layers if p.index == position]
        if planned:
            name = str(position)
            expected_input = _masked(hidden, planned[0], s.get_mask(name))
            assert isinstance(module, nn.Linear)
            expected = nn.functional.linear(expected_input, module.weight, module.bias)
            torch.testing.assert_close(module(hidden), expected)
        hidden = module(hidden)


@SETTINGS
@given(plans())
def test_masks_are_binary_hit_the_sparsity_and_zero_the_smallest(plan: Plan) -> None:
    model = plan.model()
    s = plan.sparsifier(model)
    xs = plan.inputs(plan.batches)
    for x in xs:
        model(x)
    s.step()
    for layer in plan.layers:
        reduced = _layer_inputs(model, layer.index, xs).mean(dim=0)
        if layer.groups is None:
            parts = [reduced]
        else:
            dim = layer.feature_dim % (reduced.ndim + 1) - 1  # the batch dim is reduced away
            parts = [reduced.index_select(dim, torch.tensor(g)) for g in layer.groups]
        masks = _as_list(s.get_mask(str(layer.index)))
        assert len(masks) == len(parts)
        for mask, part in zip(masks, parts, strict=True):
            assert mask.shape == part.shape
            assert bool(((mask == 0) | (mask == 1)).all())
            zeros = int((mask == 0).sum())
            assert zeros == round(layer.sparsity_level * part.numel())
            magnitude = part.abs()
            if 0 < zeros < part.numel():
                assert magnitude[mask == 0].max() <= magnitude[mask == 1].min()


PHASES = ("registered", "during calibration", "stepped", "squashed")


def _groups_without_handles(s: ActivationSparsifier) -> dict[str, dict[str, Any]]:
    return {
        name: {k: v for k, v in group.items() if k not in ("hook", "layer", "data")}
        for name, group in s.data_groups.items()
    }


def _assert_same_masks_and_data(a: ActivationSparsifier, b: ActivationSparsifier) -> None:
    assert _groups_without_handles(a) == _groups_without_handles(b)
    for name in a.data_groups:
        for left, right in (
            (a.state[name]["mask"], b.state[name]["mask"]),
            (a.data_groups[name].get("data"), b.data_groups[name].get("data")),
        ):
            if left is None or right is None:
                assert left is None
                assert right is None
            else:
                for p, q in zip(_as_list(left), _as_list(right), strict=True):
                    torch.testing.assert_close(p, q, rtol=0, atol=0)


@SETTINGS
@given(plans(), st.sampled_from(PHASES), st.data())
def test_a_state_dict_taken_at_any_point_restores_the_same_behaviour(
    plan: Plan, phase: str, data: st.DataObject
) -> None:
    model = plan.model()
    s = plan.sparsifier(model)
    xs = plan.inputs(plan.batches)
    seen = {
        "registered": 0,
        "during calibration": data.draw(st.integers(0, plan.batches)),
        "stepped": plan.batches,
        "squashed": plan.batches,
    }[phase]
    for x in xs[:seen]:
        model(x)
    if phase in ("stepped", "squashed"):
        s.step()
    if phase == "squashed":
        s.squash_mask()

    fresh = plan.model()  # same seed: same weights
    restored = ActivationSparsifier(fresh)
    restored.load_state_dict(s.state_dict())
    _assert_same_masks_and_data(s, restored)
    assert restored.defaults == s.defaults

    # Both continue the workflow identically.
    for m in (model, fresh):
        for x in xs[seen:]:
            m(x)
    if phase not in ("stepped", "squashed"):
        s.step()
        restored.step()
    if phase != "squashed":
        s.squash_mask()
        restored.squash_mask()
    _assert_same_masks_and_data(s, restored)
    probe = plan.inputs(1, offset=3)[0]
    torch.testing.assert_close(fresh(probe), model(probe), rtol=0, atol=0)
