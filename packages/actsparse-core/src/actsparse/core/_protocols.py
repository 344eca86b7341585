"""The data-group and mask protocols shared by every actsparse runtime and plugin.

A *mask* is a tensor of zeros and ones that multiplies a layer's input (it
must broadcast against it), or, for a layer registered with ``features``, a
list holding one such tensor per feature, in the order of ``features``.

A *data group* is the read-only mapping that describes one registered layer;
its keys are :data:`DATA_GROUP_KEYS`, plus ``hook`` while a hook is attached
and ``data`` while aggregated data exists.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView
from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch

__all__ = [
    "CONFIG_KEYS",
    "DATA_GROUP_KEYS",
    "HOOK_STATES",
    "AggregateFn",
    "DataGroup",
    "Mask",
    "MaskFn",
    "ReduceFn",
]

#: The keys a layer's configuration holds (and ``defaults`` holds).
CONFIG_KEYS = ("aggregate_fn", "reduce_fn", "mask_fn", "features", "feature_dim", "sparse_config")
#: The keys every data group holds.
DATA_GROUP_KEYS = (*CONFIG_KEYS, "layer", "hook_state")
#: The values of ``hook_state``: which hook is attached.
HOOK_STATES = ("aggregate", "sparsify", "None")

Mask: TypeAlias = "torch.Tensor | list[torch.Tensor]"


class AggregateFn(Protocol):
    """``fn(accumulator, x) -> accumulator``, called on every forward pass."""

    def __call__(self, accumulator: Any, x: torch.Tensor, /) -> Any: ...


class ReduceFn(Protocol):
    """``fn(aggregated) -> Tensor``, called by ``step()``."""

    def __call__(self, aggregated: Any, /) -> torch.Tensor: ...


class MaskFn(Protocol):
    """``fn(reduced, **sparse_config) -> Tensor`` of zeros and ones."""

    def __call__(self, reduced: torch.Tensor, /, **sparse_config: Any) -> torch.Tensor: ...


@runtime_checkable
class DataGroup(Protocol):
    """Read-only mapping access to one registered layer's configuration and state.

    Any :class:`collections.abc.Mapping` satisfies it.
    """

    def __getitem__(self, key: str, /) -> Any: ...

    def __contains__(self, key: object, /) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def keys(self) -> KeysView[str]: ...

    def items(self) -> ItemsView[str, Any]: ...
