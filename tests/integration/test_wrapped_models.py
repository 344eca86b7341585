"""A state saved from a wrapped model (DDP, torch.compile) loads into the plain model and back."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from actsparse.hooks import ActivationSparsifier


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _calibrated(
    model: nn.Module, layers: list[nn.Module], runner: nn.Module | None = None
) -> ActivationSparsifier:
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(layers[0])
    sparsifier.register_layer(layers[1], features=[1, 5], feature_dim=1)
    with torch.no_grad():
        for _ in range(3):
            (runner or model)(torch.randn(4, 8))
    sparsifier.step()
    sparsifier.squash_mask()
    return sparsifier


def _roundtrip(source: ActivationSparsifier, target_model: nn.Module) -> ActivationSparsifier:
    target = ActivationSparsifier(target_model)
    target.load_state_dict(source.state_dict())
    return target


def test_ddp_state_loads_into_plain_model_and_back(group_of_one: None) -> None:
    plain = _net()
    ddp = DistributedDataParallel(copy.deepcopy(plain))
    saved = _calibrated(ddp, [ddp.module[0], ddp.module[2]])
    assert set(saved.data_groups) == {"module.0", "module.2"}

    restored = _roundtrip(saved, plain)
    assert set(restored.data_groups) == {"0", "2"}
    probe = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(plain(probe), ddp(probe))

    ddp_again = DistributedDataParallel(copy.deepcopy(_net()))
    back = _roundtrip(restored, ddp_again)
    assert set(back.data_groups) == {"module.0", "module.2"}
    with torch.no_grad():
        assert torch.equal(ddp_again(probe), plain(probe))


def test_compiled_model_state_loads_into_plain_model_and_back() -> None:
    plain = _net()
    inner = copy.deepcopy(plain)
    compiled = torch.compile(inner)
    # Calibrate through the inner model: the hooks are the same, compiling is slow.
    saved = _calibrated(compiled, [inner[0], inner[2]], runner=inner)
    assert set(saved.data_groups) == {"_orig_mod.0", "_orig_mod.2"}

    restored = _roundtrip(saved, plain)
    assert set(restored.data_groups) == {"0", "2"}
    for name in ("0", "2"):
        saved_mask = saved.get_mask(f"_orig_mod.{name}")
        restored_mask = restored.get_mask(name)
        if isinstance(saved_mask, list):
            assert all(torch.equal(a, b) for a, b in zip(saved_mask, restored_mask, strict=True))
        else:
            assert torch.equal(saved_mask, restored_mask)

    back = _roundtrip(restored, torch.compile(copy.deepcopy(_net())))
    assert set(back.data_groups) == {"_orig_mod.0", "_orig_mod.2"}
