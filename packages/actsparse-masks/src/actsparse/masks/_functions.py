"""The built-in strategy functions. Each is a plain function: usable directly too."""

from __future__ import annotations

import torch

from actsparse.masks._checks import fraction

__all__ = ["magnitude_mask", "mean_over_batch", "sum_aggregate"]


def sum_aggregate(accumulator: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Elementwise running sum: ``accumulator + x`` (the accumulator keeps x's shape)."""
    return accumulator + x


def mean_over_batch(data: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0."""
    return data.mean(dim=0)


def magnitude_mask(data: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    """Zero the ``round(sparsity_level * n)`` entries of smallest absolute value.

    The registered ``magnitude`` mask strategy. ``round`` is Python's (halves
    go to the even number); which of several tied entries is zeroed is not
    specified.

    Args:
        data: The reduced data, of any shape (``n`` entries).
        sparsity_level: The fraction of entries to zero, a number in [0, 1].

    Returns:
        A mask of ``data``'s shape and dtype: zeros at the smallest entries,
        ones elsewhere.

    Raises:
        ConfigError: ``sparsity_level`` is not a number in [0, 1].
    """
    fraction("sparsity_level", sparsity_level)
    magnitudes = data.abs().flatten()
    order = torch.sort(magnitudes).indices
    n_zero = round(sparsity_level * magnitudes.numel())
    mask = torch.ones_like(magnitudes)
    mask.scatter_(0, order[:n_zero], 0)
    return mask.reshape(data.shape)
