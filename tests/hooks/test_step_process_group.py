"""step(process_group=...) in one process: validation, and no combining without peers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from actsparse.core import ConfigError
from actsparse.hooks import ActivationSparsifier


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


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a, b))  # type: ignore[arg-type]
    return a == b


@pytest.mark.parametrize("bad", [True, "world", 0, object()], ids=repr)
def test_a_bad_process_group_is_refused_and_changes_nothing(bad: object) -> None:
    _, sparsifier = _calibrated("sum")
    before = _snapshot(sparsifier)
    with pytest.raises(ConfigError, match="process_group must be None"):
        sparsifier.step(process_group=bad)
    assert _same(before, _snapshot(sparsifier))


@pytest.mark.parametrize("process_group", [None, False])
def test_without_torch_distributed_step_runs_locally(process_group: object) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    _, default = _calibrated()
    default.step(process_group=process_group)
    _, plain = _calibrated()
    plain.step()
    for name in plain.data_groups:
        assert _same(default.get_mask(name), plain.get_mask(name))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def one_process_group() -> Iterator[None]:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is absent")
def test_a_group_of_one_needs_no_combine(one_process_group: None) -> None:
    # A plain callable cannot be combined, but with one process there is nothing to combine.
    _, sparsifier = _calibrated()
    sparsifier.step()
    _, again = _calibrated()
    again.step(process_group=dist.new_group([0]))
    for name in sparsifier.data_groups:
        assert _same(sparsifier.get_mask(name), again.get_mask(name))
