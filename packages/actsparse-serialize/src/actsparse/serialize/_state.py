"""Whole-state-dict conversions that the serializer plugin exposes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actsparse.core import SerializationError
from actsparse.serialize._masks import dense_masks, sparse_coo_masks

__all__ = ["STATE_KEYS", "from_torch_ao", "to_torch_ao"]

#: The keys of torch.ao's state dict, which actsparse keeps.
STATE_KEYS = ("state", "data_groups", "defaults")


def _check(state_dict: object) -> Mapping[str, Any]:
    if not isinstance(state_dict, Mapping):
        raise SerializationError(
            f"a sparsifier state dict must be a mapping, got {type(state_dict).__name__}"
        )
    missing = [key for key in STATE_KEYS if key not in state_dict]
    if missing:
        raise SerializationError(f"the state dict lacks the key(s) {', '.join(map(repr, missing))}")
    if not isinstance(state_dict["state"], Mapping):
        raise SerializationError("state_dict['state'] must be a mapping of layer name -> state")
    return state_dict


def to_torch_ao(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict in torch.ao's in-memory shape: masks as sparse COO tensors."""
    sd = _check(state_dict)
    return {**sd, "state": sparse_coo_masks(sd["state"])}


def from_torch_ao(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A torch.ao-shaped state dict with its masks made dense again."""
    sd = _check(state_dict)
    return {**sd, "state": dense_masks(sd["state"])}
