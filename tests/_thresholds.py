"""A small MLP calibrated in threshold mode: the shared fixture of the score and
compensation tests (tests/hooks/test_weighted_score.py, test_compensation.py)."""

from __future__ import annotations

import torch
from torch import nn

from actsparse.hooks import ActivationSparsifier


def mlp(seed: int = 0, width: int = 32, *, spread: bool = False) -> nn.Sequential:
    """Linear(8, width), GELU, Linear(width, 6); ``spread``: the last layer's columns
    get norms from 0.1 to 10, so a weight-aware score differs from ``|x|``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, width), nn.GELU(), nn.Linear(width, 6))
    if spread:
        with torch.no_grad():
            model[2].weight.mul_(torch.logspace(-1, 1, width))
    return model


def data(seed: int = 1, batches: int = 4, rows: int = 64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 8, generator=generator) for _ in range(batches)]


def calibrated(
    model: nn.Sequential,
    *,
    mask_fn: str = "target_threshold",
    level: float = 0.6,
    sums: bool = False,
) -> ActivationSparsifier:
    """The last layer registered, calibrated on :func:`data`, stepped and squashed."""
    sparsifier = ActivationSparsifier(
        model,
        aggregate_fn="abs_histogram",
        reduce_fn="identity",
        mask_fn=mask_fn,
        sparsity_level=level,
        **({"feature_sums": True} if sums else {}),
    )
    sparsifier.register_layer(model[2])
    with torch.no_grad():
        for x in data():
            model(x)
    sparsifier.step()
    sparsifier.squash_mask()
    return sparsifier


def seen_input(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """What the last Linear computes on: its input after the sparsify hook."""
    seen: list[torch.Tensor] = []
    handle = model[2].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]
