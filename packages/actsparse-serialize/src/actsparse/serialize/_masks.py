"""Mask conversion between dense tensors and torch's sparse COO layout."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from actsparse.core import SerializationError

__all__ = ["dense_masks", "from_sparse_coo", "sparse_coo_masks", "to_sparse_coo"]


def to_sparse_coo(mask: torch.Tensor) -> torch.Tensor:
    """A dense mask as a sparse COO tensor (a sparse one is returned as is)."""
    return mask if mask.is_sparse else mask.to_sparse_coo()  # type: ignore[no-untyped-call]


def from_sparse_coo(mask: torch.Tensor) -> torch.Tensor:
    """A sparse COO (or dense) mask as a dense tensor."""
    return mask.to_dense() if mask.is_sparse else mask


def _map_masks(
    state: Mapping[str, Any], convert: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, layer_state in state.items():
        if not isinstance(layer_state, Mapping) or "mask" not in layer_state:
            raise SerializationError(
                f"state[{name!r}] must be a mapping with a 'mask' key, got {layer_state!r}"
            )
        mask = layer_state["mask"]
        if mask is None:
            converted: Any = None
        elif isinstance(mask, torch.Tensor):
            converted = convert(mask)
        elif isinstance(mask, (list, tuple)) and all(isinstance(m, torch.Tensor) for m in mask):
            converted = [convert(m) for m in mask]
        else:
            raise SerializationError(
                f"state[{name!r}]['mask'] must be None, a tensor or a list of tensors, "
                f"got {type(mask).__name__}"
            )
        out[name] = {**layer_state, "mask": converted}
    return out


def sparse_coo_masks(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A copy of a ``state`` mapping (name -> {"mask": ...}) with COO masks."""
    return _map_masks(state, to_sparse_coo)


def dense_masks(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A copy of a ``state`` mapping (name -> {"mask": ...}) with dense masks."""
    return _map_masks(state, from_sparse_coo)
