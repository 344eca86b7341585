"""The data-group and mask protocols shared by every actsparse runtime and plugin.

A *mask* is a tensor of zeros and ones that multiplies a layer's input (it
must broadcast against it), or, for a layer registered with ``features``, a
list holding one such tensor per feature, in the order of ``features``.

A *data group* is the read-only mapping that describes one registered layer;
its keys are ``actsparse.core.DATA_GROUP_KEYS``, plus ``hook`` while a hook is attached
and ``data`` while aggregated data exists.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView
from typing import Any, Protocol, TypeAlias, overload, runtime_checkable

import torch

__all__ = ["DataGroup", "Mask"]


Mask: TypeAlias = "torch.Tensor | list[torch.Tensor]"


@runtime_checkable
class DataGroup(Protocol):
    """Read-only mapping access to one registered layer's configuration and state.

    Any :class:`collections.abc.Mapping` satisfies it.
    """

    def __getitem__(self, key: str, /) -> Any: ...

    def __contains__(self, key: object, /) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    @overload
    def get(self, key: str, /) -> Any: ...

    @overload
    def get(self, key: str, default: Any, /) -> Any: ...

    def keys(self) -> KeysView[str]: ...

    def items(self) -> ItemsView[str, Any]: ...
