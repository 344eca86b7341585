"""Save and load state files at every point of the seed workflow, in both file formats.

Each file is loaded into a sparsifier over a fresh copy of the model: masks,
data groups and the model's outputs must be identical, and a calibration
interrupted by a save and resumed after a load must give the masks that the
uninterrupted run gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _seed import SeedCNN
from _support import same_state

import actsparse.serialize as serialize
from actsparse.core import (
    MaskStrategy,
    Registry,
    UnknownStrategyError,
    hookimpl,
    register_plugin,
    unregister_plugin,
)
from actsparse.hooks import ActivationSparsifier

FORMATS = ["safetensors", "torch"]


def _groups(sparsifier: ActivationSparsifier) -> dict[str, dict[str, Any]]:
    return {
        name: {k: v for k, v in group.items() if k not in ("hook", "layer")}
        for name, group in sparsifier.data_groups.items()
    }


def build() -> tuple[SeedCNN, ActivationSparsifier]:
    torch.manual_seed(0)
    model = SeedCNN().eval()
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model.conv1, sparsity_level=0.3)
    sparsifier.register_layer(model.linear1, features=[0, 10, 234], feature_dim=1)
    sparsifier.register_layer(model.identity1, sparsity_level=0.7)
    sparsifier.register_layer(model.identity2, features=[0, [10, 11], 20], feature_dim=1)
    return model, sparsifier


def restore(
    path: Path, model: SeedCNN, sparsifier: ActivationSparsifier
) -> tuple[SeedCNN, ActivationSparsifier]:
    fresh = SeedCNN().eval()
    fresh.load_state_dict(model.state_dict())
    restored = ActivationSparsifier(fresh)
    serialize.load_into(restored, path)
    assert restored.defaults == sparsifier.defaults
    assert same_state(_groups(restored), _groups(sparsifier))
    for name in sparsifier.state:
        assert same_state(restored.state[name]["mask"], sparsifier.state[name]["mask"]), name
        assert restored.data_groups[name]["layer"] is getattr(fresh, name)
        assert ("hook" in restored.data_groups[name]) == ("hook" in sparsifier.data_groups[name])
    return fresh, restored


def forward(model: SeedCNN, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(batch) for batch in batches]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_point_of_the_workflow(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    first = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    second = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    probe = [torch.randn(8, 1, 28, 28)]
    model, sparsifier = build()

    def checkpoint(tag: str) -> tuple[SeedCNN, ActivationSparsifier]:
        path = serialize.save(sparsifier, tmp_path / f"{tag}.state", format=fmt)
        return restore(path, model, sparsifier)

    # after registration: same outputs, and the restored copy aggregates the same way
    fresh, restored = checkpoint("registered")
    assert same_state(forward(fresh, first), forward(model, first))
    assert same_state(_groups(restored), _groups(sparsifier))

    # after forward passes, mid-calibration: resume and compare with the uninterrupted run
    fresh, restored = checkpoint("calibrating")
    assert all("data" in g for g in _groups(restored).values())
    assert same_state(forward(fresh, second), forward(model, second))
    sparsifier.step()
    restored.step()
    for name in sparsifier.state:
        assert same_state(restored.get_mask(name), sparsifier.get_mask(name)), name

    # after step(): masks are real now
    fresh, restored = checkpoint("stepped")
    assert same_state(forward(fresh, probe), forward(model, probe))

    # after squash_mask(): the masks are applied to the inputs
    sparsifier.squash_mask()
    fresh, restored = checkpoint("squashed")
    assert all(g["hook_state"] == "sparsify" for g in _groups(restored).values())
    masked = forward(model, probe)
    assert same_state(forward(fresh, probe), masked)
    unmasked = forward(SeedCNN().eval().requires_grad_(False), probe)
    assert not same_state(masked, unmasked)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resumed_calibration_matches_uninterrupted(tmp_path: Path, fmt: str) -> None:
    """A calibration saved half-way, loaded after a 'restart', gives the same masks."""
    torch.manual_seed(2)
    batches = [torch.randn(16, 1, 28, 28) for _ in range(4)]

    model, uninterrupted = build()
    forward(model, batches)
    uninterrupted.step()

    model_a, interrupted = build()
    forward(model_a, batches[:2])
    path = serialize.save(interrupted, tmp_path / "half", format=fmt)
    del interrupted

    model_b = SeedCNN().eval()
    model_b.load_state_dict(model.state_dict())
    resumed = ActivationSparsifier(model_b)
    serialize.load_into(resumed, path)
    forward(model_b, batches[2:])
    resumed.step()
    for name in uninterrupted.state:
        assert same_state(resumed.get_mask(name), uninterrupted.get_mask(name)), name


def test_default_file_is_small(tmp_path: Path) -> None:
    """Packed masks: the default file is far smaller than torch.ao's COO state dict."""
    model, sparsifier = build()
    forward(model, [torch.randn(16, 1, 28, 28)])
    sparsifier.step()
    sparsifier.squash_mask()
    ours = serialize.save(sparsifier, tmp_path / "masks.safetensors").stat().st_size
    coo = tmp_path / "coo.pt"
    torch.save(sparsifier.state_dict(), coo)
    assert ours * 30 <= coo.stat().st_size


def test_torch_ao_sparsifier_with_registered_functions_saves(tmp_path: Path) -> None:
    """torch.ao's own sparsifier, using the registered functions, is written by name."""
    import warnings

    from actsparse.masks._functions import magnitude_mask, mean_over_batch, sum_aggregate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
            ActivationSparsifier as TorchAOSparsifier,
        )

    torch.manual_seed(3)
    model = SeedCNN().eval()
    theirs = TorchAOSparsifier(
        model,
        aggregate_fn=sum_aggregate,
        reduce_fn=mean_over_batch,
        mask_fn=magnitude_mask,
        sparsity_level=0.5,
    )
    theirs.register_layer(model.identity1, sparsity_level=0.7)
    theirs.register_layer(model.linear1, features=[0, 10], feature_dim=1)
    forward(model, [torch.randn(16, 1, 28, 28)])
    theirs.step()
    path = serialize.save(theirs, tmp_path / "ao.safetensors")
    sd = serialize.load(path)
    assert sd["defaults"]["aggregate_fn"] == "sum"
    assert sd["data_groups"]["identity1"]["mask_fn"] == "magnitude"
    fresh = SeedCNN().eval()
    fresh.load_state_dict(model.state_dict())
    ours = ActivationSparsifier(fresh)
    serialize.load_into(ours, path)
    assert same_state(ours.get_mask("identity1"), theirs.get_mask("identity1"))
    assert same_state(ours.get_mask("linear1"), theirs.get_mask("linear1"))


def _keep_positive(data: torch.Tensor) -> torch.Tensor:
    return (data > 0).to(data.dtype)


class _ThirdParty:
    @hookimpl
    def actsparse_mask_strategies(self) -> list[MaskStrategy]:
        return [MaskStrategy(name="acme_keep_positive", fn=_keep_positive, params=())]


def test_a_file_naming_a_strategy_that_is_not_installed_says_so(tmp_path: Path) -> None:
    plugin = _ThirdParty()
    register_plugin(plugin, name="acme-masks")
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        sparsifier = ActivationSparsifier(
            model, aggregate_fn="sum", reduce_fn="mean", mask_fn="acme_keep_positive"
        )
        sparsifier.register_layer(model[0])
        model(torch.randn(2, 4))
        sparsifier.step()
        path = serialize.save(sparsifier, tmp_path / "acme.safetensors")
    finally:
        unregister_plugin(plugin)
    target = ActivationSparsifier(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(UnknownStrategyError) as info:
        serialize.load_into(target, path)
    message = str(info.value)
    assert message.startswith(
        f"{path}: the state dict names a strategy that is not installed here: layer '0': "
        "unknown mask strategy 'acme_keep_positive'"
    )
    assert "No installed plugin provides it: install the plugin that registers it" in message
    assert "pip install" not in message  # actsparse-masks would not provide it
    assert target.data_groups == {}


def test_a_file_naming_a_builtin_says_which_package_ships_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model[0])
    path = serialize.save(sparsifier, tmp_path / "builtin.safetensors")
    sd = serialize.load(path)
    without_masks = Registry()  # only what the state file needs besides the strategies
    monkeypatch.setattr("actsparse.hooks._sparsifier.get_registry", lambda: without_masks)
    with pytest.raises(UnknownStrategyError, match=r"it comes with `pip install actsparse-masks`"):
        ActivationSparsifier(torch.nn.Sequential(torch.nn.Linear(4, 4))).load_state_dict(sd)
