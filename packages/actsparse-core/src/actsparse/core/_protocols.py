"""The data-group and mask protocols shared by every actsparse runtime and plugin.

A *mask* is a tensor of zeros and ones that multiplies a layer's input (it
must broadcast against it), or, for a layer registered with ``features``, a
list holding one such tensor per feature, in the order of ``features``.

A *data group* is the read-only mapping that describes one registered layer;
its keys are ``actsparse.core.DATA_GROUP_KEYS``, plus ``hook`` while a hook is attached
and ``data`` while aggregated data exists.

A *command registrar* is what the ``actsparse_cli_commands`` hook receives to
add subcommands to the ``actsparse`` command line.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, KeysView
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, overload, runtime_checkable

import torch

if TYPE_CHECKING:
    import argparse

__all__ = ["CommandRegistrar", "DataGroup", "Mask"]


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


class CommandRegistrar(Protocol):
    """Adds subcommands to the ``actsparse`` command line (see ``actsparse_cli_commands``)."""

    def add(
        self,
        name: str,
        *,
        help: str,
        run: Callable[[argparse.Namespace], int | None],
        configure: Callable[[argparse.ArgumentParser], object] | None = None,
        description: str | None = None,
    ) -> None:
        """Add the subcommand ``actsparse NAME``.

        Args:
            name: What users type after ``actsparse``: letters, digits, ``-``,
                ``_`` and ``.``, not starting with ``-``. A name that another
                plugin added already is refused, naming both plugins.
            help: One line for ``actsparse --help``.
            run: Runs the command with the parsed arguments and returns its
                exit status (``None`` means 0). An error of the
                :class:`~actsparse.core.ActsparseError` family becomes a
                one-line message and exit status 1.
            configure: Adds the command's arguments to its
                :class:`argparse.ArgumentParser` (``add_argument``, argument
                groups, ``set_defaults``); called each time the command line
                is built, so keep it cheap and import heavy packages in
                ``run``.
            description: The text of ``actsparse NAME --help``; default ``help``.
        """
        ...
