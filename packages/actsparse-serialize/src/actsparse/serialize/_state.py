"""Whole-state-dict conversions that the ``sparse_coo`` serializer exposes.

The layout and its checks belong to :mod:`actsparse.core`; these two
functions only choose the masks' layout.
"""

from __future__ import annotations

from typing import Any

from actsparse.core import STATE_KEYS, convert_masks

__all__ = ["STATE_KEYS", "from_torch_ao", "to_torch_ao"]


def to_torch_ao(state_dict: object) -> dict[str, Any]:
    """The state dict in torch.ao's in-memory shape: masks as sparse COO tensors."""
    return convert_masks(state_dict, sparse=True)


def from_torch_ao(state_dict: object) -> dict[str, Any]:
    """A torch.ao-shaped state dict with its masks made dense again (indices checked)."""
    return convert_masks(state_dict, sparse=False)
