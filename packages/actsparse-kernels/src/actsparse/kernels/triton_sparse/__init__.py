"""``triton_sparse``: threshold mode's linear layer as a Triton kernel, on CUDA.

For each token, ``F.linear(F.hardshrink(x, t), W, b)`` needs only the weight
rows (input-major, :func:`~actsparse.kernels.to_input_major`) of the inputs
with ``not |x| <= t``; the kernel (:mod:`._kernel`, a split-K matrix-vector
product over the kept inputs) reads only those. It runs on CUDA in float16
and bfloat16, needs the ``triton`` package (the ``actsparse-kernels[triton]``
extra) and is imported only when it first runs. The torch custom op
``actsparse::triton_sparse_linear`` (:mod:`._op`) wraps it for eager mode and
``torch.compile``; :func:`measure_cuda_crossover` times it against cuBLAS.
:data:`KERNEL` is the record that :mod:`actsparse.kernels.plugin` registers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from actsparse.core import KernelStrategy
from actsparse.kernels._common.linear import linear_apply, linear_support
from actsparse.kernels._common.status import KernelStatus
from actsparse.kernels.triton_sparse._crossover import (
    clear_cuda_crossover_cache,
    measure_cuda_crossover,
)
from actsparse.kernels.triton_sparse._op import OP_NAME, interpreted_kernels, triton_sparse_linear
from actsparse.kernels.triton_sparse._status import INSTALL_HINT, TRITON_DTYPES, status

__all__ = [
    "KERNEL_NAME",
    "INSTALL_HINT",
    "KERNEL",
    "OP_NAME",
    "TRITON_DTYPES",
    "clear_cuda_crossover_cache",
    "interpreted_kernels",
    "measure_cuda_crossover",
    "triton_kernel_status",
    "triton_sparse_linear",
]


def triton_kernel_status() -> KernelStatus:
    """Whether the Triton kernel can run in this process (triton imports, a CUDA device
    is there), and if not, what is missing."""
    return status()


def _supports(module: Any) -> str | None:
    """None for an ``nn.Linear`` whose weight is a float16 or bfloat16 CUDA tensor (or a CPU
    one while Triton's interpreter runs the kernel), else why the kernel cannot compute it."""
    where = "on CUDA devices"
    reason = linear_support(module, device_type="cuda", dtypes=TRITON_DTYPES, where=where)
    # TRITON_INTERPRET=1: the same kernel, interpreted on CPU tensors (slowly, for tests)
    if (
        reason is not None
        and interpreted_kernels() is not None
        and linear_support(module, device_type="cpu", dtypes=TRITON_DTYPES, where=where) is None
    ):
        return None
    return reason


def _available() -> str | None:
    """None when triton imports and torch sees a CUDA device (or Triton's interpreter is
    on), else what is missing."""
    found = status()
    if found.available or interpreted_kernels() is not None:
        return None
    return found.reason


def _layer_crossover(module: nn.Linear, sparsity: float) -> int:
    """The measured number of tokens up to which the kernel beats cuBLAS on the layer
    (0 for a layer on the CPU: interpreted, it never wins)."""
    weight = module.weight
    if weight.device.type != "cuda":
        return 0
    return measure_cuda_crossover(
        module.in_features, module.out_features, weight.dtype, sparsity, device=weight.device
    )


#: the name users pass as ``kernel``
KERNEL_NAME = "triton_sparse"

#: the ``triton_sparse`` kernel
KERNEL = KernelStrategy(
    name=KERNEL_NAME,
    supports=_supports,
    apply=linear_apply(triton_sparse_linear),
    available=_available,
    crossover=_layer_crossover,
    description="nn.Linear on CUDA (float16, bfloat16): a Triton kernel that skips "
    f"the weight rows of zeroed inputs; needs triton ({INSTALL_HINT})",
)
