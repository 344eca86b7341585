"""Mask conversion between dense tensors and torch's sparse COO layout.

The conversions belong to :mod:`actsparse.core`, which owns the state dict's
layout; these names are kept for users of ``actsparse.serialize``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from actsparse.core import checked_sparse_coo, convert_masks, mask_to_dense, mask_to_sparse

__all__ = [
    "checked_sparse_coo",
    "dense_masks",
    "from_sparse_coo",
    "sparse_coo_masks",
    "to_sparse_coo",
]


def to_sparse_coo(mask: torch.Tensor, *, where: str = "mask") -> torch.Tensor:
    """A dense mask as a sparse COO tensor (a sparse one is checked and returned)."""
    return mask_to_sparse(mask, where=where)


def from_sparse_coo(mask: torch.Tensor, *, where: str = "mask") -> torch.Tensor:
    """A sparse COO (or dense) mask as a dense tensor; the indices are checked first."""
    return mask_to_dense(mask, where=where)


def _as_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    return {"state": state, "data_groups": {}, "defaults": {}}


def sparse_coo_masks(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A copy of a ``state`` mapping (name -> {"mask": ...}) with COO masks."""
    out: dict[str, dict[str, Any]] = convert_masks(_as_state_dict(state), sparse=True)["state"]
    return out


def dense_masks(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A copy of a ``state`` mapping (name -> {"mask": ...}) with dense masks."""
    out: dict[str, dict[str, Any]] = convert_masks(_as_state_dict(state), sparse=False)["state"]
    return out
