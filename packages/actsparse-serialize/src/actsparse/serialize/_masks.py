"""Mask conversion between dense tensors and torch's sparse COO layout."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from actsparse.core import SerializationError

__all__ = [
    "checked_sparse_coo",
    "dense_masks",
    "from_sparse_coo",
    "sparse_coo_masks",
    "to_sparse_coo",
]


def checked_sparse_coo(mask: torch.Tensor, where: str = "mask") -> torch.Tensor:
    """``mask`` (a sparse COO tensor) rebuilt from its raw indices and values once they pass.

    A sparse tensor built with ``check_invariants=False``, or read by
    ``torch.load`` (which does not check them by default), may hold indices
    outside its shape; ``to_dense()`` and other kernels then read and write
    out of bounds, silently or with a segfault. Nothing here touches the
    values before the indices are checked. The result is marked uncoalesced,
    whatever the original claimed, so duplicate indices are summed as torch
    defines.
    """
    indices = mask._indices()
    values = mask._values()
    if (
        indices.dtype != torch.int64
        or indices.dim() != 2
        or indices.shape[0] != mask.sparse_dim()
        or values.shape[:1] != indices.shape[1:]
        or values.shape[1:] != mask.shape[mask.sparse_dim() :]
    ):
        raise SerializationError(
            f"{where}: a malformed sparse COO tensor: indices {tuple(indices.shape)} of "
            f"{indices.dtype}, values {tuple(values.shape)}, shape {tuple(mask.shape)}"
        )
    if indices.numel():
        low = indices.amin(dim=1)
        high = indices.amax(dim=1)
        bounds = torch.tensor(mask.shape[: mask.sparse_dim()], dtype=torch.int64)
        outside = (low < 0) | (high >= bounds.to(high.device))
        if bool(outside.any()):
            dim = int(torch.nonzero(outside)[0])
            raise SerializationError(
                f"{where}: sparse COO indices out of range: dimension {dim} has size "
                f"{int(bounds[dim])}, the indices span [{int(low[dim])}, {int(high[dim])}]"
            )
    return torch.sparse_coo_tensor(indices, values, mask.shape, check_invariants=True)


def to_sparse_coo(mask: torch.Tensor, *, where: str = "mask") -> torch.Tensor:
    """A dense mask as a sparse COO tensor (a sparse one is checked and returned)."""
    if mask.is_sparse:
        checked_sparse_coo(mask, where)
        return mask
    sparse: torch.Tensor = mask.to_sparse_coo()  # type: ignore[no-untyped-call]
    return sparse


def from_sparse_coo(mask: torch.Tensor, *, where: str = "mask") -> torch.Tensor:
    """A sparse COO (or dense) mask as a dense tensor; the indices are checked first."""
    return checked_sparse_coo(mask, where).to_dense() if mask.is_sparse else mask


def _map_masks(
    state: Mapping[str, Any], convert: Callable[..., torch.Tensor]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, layer_state in state.items():
        if not isinstance(layer_state, Mapping) or "mask" not in layer_state:
            raise SerializationError(
                f"state[{name!r}] must be a mapping with a 'mask' key, got {layer_state!r}"
            )
        mask = layer_state["mask"]
        where = f"state[{name!r}]['mask']"
        if mask is None:
            converted: Any = None
        elif isinstance(mask, torch.Tensor):
            converted = convert(mask, where=where)
        elif isinstance(mask, (list, tuple)) and all(isinstance(m, torch.Tensor) for m in mask):
            converted = [convert(m, where=f"{where}[{i}]") for i, m in enumerate(mask)]
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
