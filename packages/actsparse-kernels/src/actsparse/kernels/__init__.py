"""actsparse.kernels: the zero-skipping kernels of threshold mode, as a plugin.

A squashed threshold-mode layer zeroes the entries ``|x| <= threshold`` of its
input, then runs. A kernel computes both at once and skips the work of the
zeros. This distribution registers, through the ``actsparse`` entry-point
group:

* ``cpu_sparse`` (:mod:`actsparse.kernels.cpu_sparse`): ``nn.Linear`` on the
  CPU in float32 and bfloat16, a C++ kernel compiled on first use;
* ``cpu_sparse_int8`` and ``cpu_sparse_int4`` (:mod:`actsparse.kernels.cpu_sparse_int8`,
  :mod:`actsparse.kernels.cpu_sparse_int4`): float32 ``nn.Linear`` on the CPU with
  its weights quantized to 8 or 4 bits in place (lossy, only when named);
* ``triton_sparse`` (:mod:`actsparse.kernels.triton_sparse`): ``nn.Linear`` on
  CUDA in float16 and bfloat16, a Triton kernel (the ``[triton]`` extra).

Users pick them by name (``squash_mask(kernel="cpu_sparse")``) or let
``kernel="auto"`` choose; the functions below are for measuring and for
calling the ops directly.
"""

from __future__ import annotations

import importlib.metadata

from actsparse.kernels._common.build import CACHE_ENV_VAR, DISABLE_ENV_VAR, CppExtension
from actsparse.kernels._common.layout import is_input_major, to_input_major, to_output_major
from actsparse.kernels._common.quantized import QuantizedWeights, quantized_weights
from actsparse.kernels._common.reference import sparse_linear_reference
from actsparse.kernels._common.status import KernelStatus, KernelUnavailableError
from actsparse.kernels.cpu_sparse import (
    clear_crossover_cache,
    cpu_kernel_status,
    measure_crossover,
    sparse_linear,
)
from actsparse.kernels.cpu_sparse_int4 import int4_kernel_status, sparse_linear_int4
from actsparse.kernels.cpu_sparse_int8 import int8_kernel_status, sparse_linear_int8
from actsparse.kernels.triton_sparse import (
    clear_cuda_crossover_cache,
    measure_cuda_crossover,
    triton_kernel_status,
    triton_sparse_linear,
)

__version__ = importlib.metadata.version("actsparse-kernels")

__all__ = [
    "CACHE_ENV_VAR",
    "DISABLE_ENV_VAR",
    "CppExtension",
    "KernelStatus",
    "KernelUnavailableError",
    "QuantizedWeights",
    "__version__",
    "clear_crossover_cache",
    "clear_cuda_crossover_cache",
    "cpu_kernel_status",
    "int4_kernel_status",
    "int8_kernel_status",
    "is_input_major",
    "measure_crossover",
    "measure_cuda_crossover",
    "quantized_weights",
    "sparse_linear",
    "sparse_linear_int4",
    "sparse_linear_int8",
    "sparse_linear_reference",
    "to_input_major",
    "to_output_major",
    "triton_kernel_status",
    "triton_sparse_linear",
]
