"""The actsparse-hooks plugin: the runtime's kernels, registered through the ``actsparse``
entry-point group like any third party's."""

from __future__ import annotations

from typing import Any

from actsparse.core import KernelStrategy, hookimpl

__all__ = ["actsparse_kernels"]


def _any_module(module: Any) -> str | None:
    return None


@hookimpl
def actsparse_kernels() -> list[KernelStrategy]:
    return [
        KernelStrategy(
            name="dense",
            supports=_any_module,
            description="zero |x| <= t with one hardshrink in a pre-hook, then the layer "
            "(the default)",
        ),
    ]
