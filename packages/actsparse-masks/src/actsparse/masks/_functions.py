"""The built-in strategy functions. Each is a plain function: usable directly too."""

from __future__ import annotations

import torch

from actsparse.core import ConfigError

__all__ = ["magnitude_mask", "mean_over_batch", "sum_aggregate"]


def sum_aggregate(accumulator: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Elementwise running sum: ``accumulator + x`` (the accumulator keeps x's shape)."""
    return accumulator + x


def mean_over_batch(data: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0."""
    return data.mean(dim=0)


def magnitude_mask(data: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """Zero the ``round(sparsity_level * n)`` entries of smallest absolute value.

    Returns a mask of ``data``'s shape and dtype holding ones elsewhere.
    """
    if isinstance(sparsity_level, bool) or not isinstance(sparsity_level, (int, float)):
        raise ConfigError(f"sparsity_level must be a number, got {sparsity_level!r}")
    if not 0.0 <= sparsity_level <= 1.0:
        raise ConfigError(f"sparsity_level must lie in [0, 1], got {sparsity_level!r}")
    magnitudes = data.abs().flatten()
    order = torch.sort(magnitudes).indices
    n_zero = round(sparsity_level * magnitudes.numel())
    mask = torch.ones_like(magnitudes)
    mask.scatter_(0, order[:n_zero], 0)
    return mask.reshape(data.shape)
