"""Compute kernels for threshold mode: the zero-skipping linear layer.

In threshold mode a layer's input is zeroed where ``|x| <= threshold`` and the
dense layer runs. :func:`sparse_linear` (the torch custom op
``actsparse::sparse_linear``) computes the same thing while skipping the
weight rows of zeroed inputs: at one token, where a linear layer is bound by
memory bandwidth, that is where the speed is. It needs the weight stored
input-major (:func:`to_input_major`) and a C++ kernel that is compiled on
first use (:func:`cpu_kernel_status` says whether that worked, and why not).
:func:`measure_crossover` measures up to how many tokens it pays.
"""

from __future__ import annotations

from actsparse.hooks._kernels._build import (
    CACHE_ENV_VAR,
    DISABLE_ENV_VAR,
    KernelStatus,
    KernelUnavailableError,
    cpu_kernel_status,
    require_cpu_kernel,
)
from actsparse.hooks._kernels._crossover import clear_crossover_cache, measure_crossover
from actsparse.hooks._kernels._layout import is_input_major, to_input_major, to_output_major
from actsparse.hooks._kernels._ops import (
    KERNEL_DTYPES,
    OP_NAME,
    sparse_linear,
    sparse_linear_reference,
)

__all__ = [
    "CACHE_ENV_VAR",
    "DISABLE_ENV_VAR",
    "KERNEL_DTYPES",
    "OP_NAME",
    "KernelStatus",
    "KernelUnavailableError",
    "clear_crossover_cache",
    "cpu_kernel_status",
    "is_input_major",
    "measure_crossover",
    "require_cpu_kernel",
    "sparse_linear",
    "sparse_linear_reference",
    "to_input_major",
    "to_output_major",
]
