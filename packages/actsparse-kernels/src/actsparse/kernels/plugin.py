"""The actsparse-kernels plugin: one line per kernel, registered through the ``actsparse``
entry-point group like any third party's.

A kernel is one folder of this package that defines its ``KernelStrategy``
as ``KERNEL``; adding one is adding its folder and its line here (see
"Adding a kernel" in docs/kernels.md).
"""

from __future__ import annotations

from actsparse.core import KernelStrategy, hookimpl
from actsparse.kernels import cpu_sparse, cpu_sparse_int4, cpu_sparse_int8, triton_sparse

__all__ = ["actsparse_kernels"]


@hookimpl
def actsparse_kernels() -> list[KernelStrategy]:
    return [
        cpu_sparse.KERNEL,
        cpu_sparse_int8.KERNEL,
        cpu_sparse_int4.KERNEL,
        triton_sparse.KERNEL,
    ]
