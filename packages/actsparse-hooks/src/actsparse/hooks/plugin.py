"""The actsparse-hooks plugin: the runtime's own kernel, registered through the ``actsparse``
entry-point group like any third party's.

``dense`` zeroes ``|x| <= t`` with one ``hardshrink`` in a pre-hook, then runs
the layer's own forward: the default, what a state file restores, and what
works on every module, device and dtype. The zero-skipping kernels
(``cpu_sparse``, ``triton_sparse``) come with actsparse-kernels.
"""

from __future__ import annotations

from typing import Any

from actsparse.core import KernelStrategy, hookimpl
from actsparse.hooks._execution import DENSE

__all__ = ["actsparse_kernels"]


def _any_module(module: Any) -> str | None:
    return None


@hookimpl
def actsparse_kernels() -> list[KernelStrategy]:
    return [
        KernelStrategy(
            name=DENSE,
            supports=_any_module,
            description="zero |x| <= t with one hardshrink in a pre-hook, then the layer "
            "(the default)",
        ),
    ]
