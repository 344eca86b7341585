"""Reduce strategies: turn the aggregated data into the tensor a mask is computed from."""

from __future__ import annotations

import torch

__all__ = ["identity_reduce", "l2_over_batch", "max_over_batch", "sum_over_batch"]


def identity_reduce(data: torch.Tensor) -> torch.Tensor:
    """The data unchanged (for streaming aggregates, whose data has no batch dim)."""
    return data


def sum_over_batch(data: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0."""
    return data.sum(dim=0)


def max_over_batch(data: torch.Tensor) -> torch.Tensor:
    """Maximum over dim 0."""
    return data.amax(dim=0)


def l2_over_batch(data: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over dim 0: ``sqrt(sum(x ** 2, dim=0))``."""
    norm: torch.Tensor = torch.linalg.vector_norm(data, ord=2, dim=0)
    return norm
