"""The GPU path: threshold mode's linear layer as a Triton kernel, ``triton_sparse``.

For each token, ``F.linear(F.hardshrink(x, t), W, b)`` needs only the weight
rows (input-major, :func:`~actsparse.hooks.to_input_major`) of the inputs
with ``not |x| <= t``; the kernel (:mod:`._kernel`, a split-K matrix-vector
product over the kept inputs) reads only those. It runs on CUDA in float16
and bfloat16, needs the ``triton`` package (the ``actsparse-hooks[triton]``
extra) and is imported only when it first runs. The torch custom op
``actsparse::triton_sparse_linear`` (:mod:`._op`) wraps it for eager mode and
``torch.compile``; :func:`measure_cuda_crossover` times it against cuBLAS.

:func:`kernel_strategy` is the ``KernelStrategy`` that ``actsparse.hooks.plugin``
registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from actsparse.core import KernelStrategy
from actsparse.hooks._kernels import KernelStatus, to_input_major
from actsparse.hooks._triton._crossover import (
    clear_cuda_crossover_cache,
    last_winning_count,
    measure_cuda_crossover,
)
from actsparse.hooks._triton._op import OP_NAME, interpreted_kernels, triton_sparse_linear
from actsparse.hooks._triton._status import INSTALL_HINT, TRITON_DTYPES, status

__all__ = [
    "INSTALL_HINT",
    "KERNEL_NAME",
    "OP_NAME",
    "TRITON_DTYPES",
    "clear_cuda_crossover_cache",
    "interpreted_kernels",
    "kernel_strategy",
    "last_winning_count",
    "measure_cuda_crossover",
    "triton_kernel_status",
    "triton_sparse_linear",
]

#: the name users pass as ``kernel``
KERNEL_NAME = "triton_sparse"


def triton_kernel_status() -> KernelStatus:
    """Whether the Triton kernel can run in this process (triton imports, a CUDA device
    is there), and if not, what is missing."""
    return status()


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def supports(module: Any) -> str | None:
    """None for an ``nn.Linear`` whose weight is a float16 or bfloat16 CUDA tensor,
    else why the kernel cannot compute ``module``."""
    if not isinstance(module, nn.Linear):
        return f"it is a {type(module).__name__}, and the kernel computes nn.Linear layers"
    weight = module.weight
    if weight.device.type != "cuda":
        return f"its weight is on {weight.device}, and the kernel runs on CUDA devices"
    if weight.dtype not in TRITON_DTYPES:
        dtype = str(weight.dtype).removeprefix("torch.")
        return f"its weight is {dtype}, not one of {_names(TRITON_DTYPES)}"
    return None


def available() -> str | None:
    """None when triton imports and torch sees a CUDA device, else what is missing."""
    found = status()
    return None if found.available else found.reason


def apply(module: nn.Linear, threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(x)``: the layer on ``x`` with ``|x| <= threshold`` zeroed, by the Triton op.

    Re-stores the weight input-major once (the parameter becomes its
    transposed view; one copy of the weight, as for ``cpu_sparse``).
    """
    weight_t = to_input_major(module)
    bias = None if module.bias is None else module.bias.detach()

    def run(x: torch.Tensor) -> torch.Tensor:
        return triton_sparse_linear(x, weight_t, bias, threshold)

    return run


def crossover(module: nn.Linear, sparsity: float) -> int:
    """The measured number of tokens up to which the kernel beats cuBLAS on the layer."""
    weight = module.weight
    return measure_cuda_crossover(
        module.in_features, module.out_features, weight.dtype, sparsity, device=weight.device
    )


def kernel_strategy() -> KernelStrategy:
    """The ``triton_sparse`` kernel plugin."""
    return KernelStrategy(
        name=KERNEL_NAME,
        supports=supports,
        apply=apply,
        available=available,
        crossover=crossover,
        description="nn.Linear on CUDA (float16, bfloat16): a Triton kernel that skips "
        f"the weight rows of zeroed inputs; needs triton ({INSTALL_HINT})",
    )
