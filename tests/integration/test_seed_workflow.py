"""The seed workflow, end to end, on the seed CNN.

The workflow: construct a sparsifier with default functions and config,
register four layers (two whole, two on selected features of dimension 1),
aggregate their inputs over several forward passes, step() to compute the
masks, squash_mask() so that the layers see input * mask, and unregister a
layer to give it back its plain input. Every step is checked against values
computed here from the recorded layer inputs, and the state dict is saved and
restored into a fresh sparsifier at each point of the workflow.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import pytest
import torch
from _seed import SeedCNN

from actsparse.core import module_to_fqn
from actsparse.hooks import ActivationSparsifier


def add(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return left + right


def batch_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=0)


def smallest_off(data: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """Reference magnitude mask: zero the round(level * n) smallest |x|."""
    flat = data.abs().flatten()
    keep = torch.ones_like(flat)
    count = round(sparsity_level * flat.numel())
    keep[torch.sort(flat).indices[:count]] = 0
    return keep.view(data.shape)


LAYERS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("conv1", {"mask_fn": smallest_off}, {"sparsity_level": 0.3}),
    ("linear1", {"features": [0, 10, 234], "feature_dim": 1, "mask_fn": smallest_off}, {}),
    ("identity1", {"mask_fn": smallest_off}, {"sparsity_level": 0.7}),
    ("identity2", {"features": [0, 10, 20], "feature_dim": 1, "mask_fn": smallest_off}, {}),
]
DEFAULTS = {"aggregate_fn": add, "reduce_fn": batch_mean}
SPARSE_CONFIG = {"sparsity_level": 0.5}


def _masks_equal(left: Any, right: Any) -> bool:
    if left is None or right is None:
        return left is None and right is None
    if isinstance(left, list):
        return (
            isinstance(right, list)
            and len(left) == len(right)
            and all(torch.equal(a, b) for a, b in zip(left, right, strict=True))
        )
    return isinstance(right, torch.Tensor) and torch.equal(left, right)


def _plain(group: Any) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ("hook", "layer")}


def _groups_equal(left: dict[str, Any], right: dict[str, Any]) -> bool:
    if left.keys() != right.keys():
        return False
    for key, value in left.items():
        if key == "data":
            if not _masks_equal(value, right[key]):
                return False
        elif value != right[key]:
            return False
    return True


def roundtrip(sparsifier: ActivationSparsifier, model: SeedCNN) -> ActivationSparsifier:
    """Restore ``sparsifier``'s state dict into a fresh model; check what came back."""
    state_dict = sparsifier.state_dict()
    assert set(state_dict) >= {"state", "data_groups", "defaults"}
    for layer_state in state_dict["state"].values():
        mask = layer_state["mask"]
        for m in mask if isinstance(mask, list) else [] if mask is None else [mask]:
            assert m.is_sparse
    for group in state_dict["data_groups"].values():
        assert "hook" not in group
        assert "layer" not in group

    fresh = SeedCNN()
    fresh.load_state_dict(model.state_dict())
    restored = ActivationSparsifier(fresh)
    assert restored.defaults != sparsifier.defaults
    restored.load_state_dict(state_dict)

    assert restored.defaults == sparsifier.defaults
    assert restored.state.keys() == sparsifier.state.keys()
    for name, layer_state in restored.state.items():
        assert _masks_equal(layer_state["mask"], sparsifier.state[name]["mask"]), name
    for name, group in sparsifier.data_groups.items():
        assert name in restored.data_groups
        assert _groups_equal(_plain(group), _plain(restored.data_groups[name])), name
        assert restored.data_groups[name]["layer"] is getattr(fresh, name)
        assert ("hook" in restored.data_groups[name]) == ("hook" in group)
    return restored


@pytest.fixture
def recorded_inputs() -> dict[str, list[torch.Tensor]]:
    return defaultdict(list)


def test_seed_workflow(recorded_inputs: dict[str, list[torch.Tensor]]) -> None:
    torch.manual_seed(0)
    model = SeedCNN()

    # Record each layer's input with a pre-hook that runs before the sparsifier's.
    for name, _, _ in LAYERS:
        getattr(model, name).register_forward_pre_hook(
            lambda module, args, name=name: recorded_inputs[name].append(args[0].clone())
        )

    # 1. constructor
    sparsifier = ActivationSparsifier(model, **DEFAULTS, **SPARSE_CONFIG)
    assert sparsifier.model is model
    assert sparsifier.defaults == {
        "aggregate_fn": add,
        "reduce_fn": batch_mean,
        "mask_fn": None,
        "features": None,
        "feature_dim": None,
        "sparse_config": SPARSE_CONFIG,
    }
    assert ActivationSparsifier(SeedCNN()).defaults != sparsifier.defaults

    # 2. register_layer
    for name, args, config in LAYERS:
        sparsifier.register_layer(getattr(model, name), **args, **config)
    assert len(sparsifier.data_groups) == len(LAYERS)
    for name, args, config in LAYERS:
        assert module_to_fqn(model, getattr(model, name)) == name
        group = sparsifier.data_groups[name]
        assert group["sparse_config"] == {**SPARSE_CONFIG, **config}
        expected = {**DEFAULTS, "features": None, "feature_dim": None, **args}
        for key, value in expected.items():
            assert key in group
            assert group[key] == value
            assert group.get(key) == value
        assert group["layer"] is getattr(model, name)
        assert group["hook_state"] == "aggregate"
        assert "data" not in group
        assert sparsifier.state[name]["mask"] is None
        with pytest.raises(ValueError, match="no mask yet"):
            sparsifier.get_mask(name=name)
    roundtrip(sparsifier, model)

    # 3. aggregation over forward passes
    batches = [torch.randn(16, 1, 28, 28) for _ in range(3)]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    aggregated: dict[str, Any] = {}
    for name, args, _ in LAYERS:
        inputs = recorded_inputs[name]
        assert len(inputs) == len(batches)
        features = args.get("features")
        if features is None:
            total = torch.zeros_like(inputs[0])
            for x in inputs:
                total = add(total, x)
            aggregated[name] = total
        else:
            per_feature = []
            for f in features:
                total = torch.zeros_like(inputs[0][:, f : f + 1])
                for x in inputs:
                    total = add(total, x[:, f : f + 1])
                per_feature.append(total)
            aggregated[name] = per_feature
        assert _masks_equal(sparsifier.data_groups[name]["data"], aggregated[name]), name
        # the mask exists (all ones) once the layer has seen an input
        mask = sparsifier.get_mask(name)
        assert _masks_equal(mask, sparsifier.get_mask(layer=getattr(model, name)))
    mid = roundtrip(sparsifier, model)

    # 4. step
    sparsifier.step()
    for name, _, config in LAYERS:
        level = {**SPARSE_CONFIG, **config}["sparsity_level"]
        data = aggregated[name]
        if isinstance(data, list):
            expected_mask: Any = [smallest_off(batch_mean(d), level) for d in data]
        else:
            expected_mask = smallest_off(batch_mean(data), level)
        assert _masks_equal(sparsifier.get_mask(name), expected_mask), name
    for group in sparsifier.data_groups.values():
        assert "data" not in group
    # the state restored mid-calibration gives the same masks after the same step
    mid.step()
    for name in sparsifier.state:
        assert _masks_equal(mid.get_mask(name), sparsifier.get_mask(name)), name
    roundtrip(sparsifier, model)

    # 5. squash_mask: identity layers see input * mask
    sparsifier.squash_mask()
    for group in sparsifier.data_groups.values():
        assert group["hook_state"] == "sparsify"
    seen: dict[str, torch.Tensor] = {}
    for name in ("identity1", "identity2"):
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, out)
        )
    recorded_inputs.clear()
    probe = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        model(probe)
    raw1 = recorded_inputs["identity1"][0]
    assert torch.equal(seen["identity1"], raw1 * sparsifier.get_mask("identity1"))
    raw2 = recorded_inputs["identity2"][0]
    expected2 = raw2.clone()
    for f, m in zip([0, 10, 20], sparsifier.get_mask("identity2"), strict=True):
        expected2[:, f : f + 1] = raw2[:, f : f + 1] * m
    assert torch.equal(seen["identity2"], expected2)
    # the caller's tensor is never modified in place
    assert torch.equal(raw2, recorded_inputs["identity2"][0])

    restored = roundtrip(sparsifier, model)
    with torch.no_grad():
        assert torch.equal(restored.model(probe), model(probe))

    # 6. unregister_layer
    sparsifier.unregister_layer("identity1")
    assert "identity1" not in sparsifier.data_groups
    assert "identity1" not in sparsifier.state
    recorded_inputs.clear()
    with torch.no_grad():
        model(probe)
    assert torch.equal(seen["identity1"], recorded_inputs["identity1"][0])


def test_registered_names_match_the_callables() -> None:
    """The built-in strategies by name give the same masks as the seed's functions."""
    torch.manual_seed(1)
    model = SeedCNN()
    twin = copy.deepcopy(model)
    by_fn = ActivationSparsifier(model, **DEFAULTS, mask_fn=smallest_off, **SPARSE_CONFIG)
    by_name = ActivationSparsifier(
        twin, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", **SPARSE_CONFIG
    )
    for sparsifier, net in ((by_fn, model), (by_name, twin)):
        for name, args, config in LAYERS:
            args = {k: v for k, v in args.items() if k != "mask_fn"}
            sparsifier.register_layer(getattr(net, name), **args, **config)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(8, 1, 28, 28)
            model(x)
            twin(x)
    by_fn.step()
    by_name.step()
    for name, _, _ in LAYERS:
        assert _masks_equal(by_fn.get_mask(name), by_name.get_mask(name)), name
    by_fn.squash_mask()
    by_name.squash_mask()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    # names are what the state dict holds
    assert by_name.state_dict()["data_groups"]["conv1"]["mask_fn"] == "magnitude"
