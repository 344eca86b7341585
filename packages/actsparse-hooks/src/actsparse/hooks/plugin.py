"""The actsparse-hooks plugin: the runtime's kernels, registered through the ``actsparse``
entry-point group like any third party's.

* ``dense``: zero ``|x| <= t`` with one ``hardshrink`` in a pre-hook, then the
  layer's own forward (the default, and what a state file restores).
* ``cpu_sparse``: the zero-skipping ``actsparse::sparse_linear`` op for
  ``nn.Linear`` layers on the CPU in float32 or bfloat16, compiled on first
  use; it stores the layer's weight input-major, once.
* ``triton_sparse``: the same for ``nn.Linear`` layers on CUDA in float16 or
  bfloat16, a Triton kernel; it needs the ``actsparse-hooks[triton]`` extra
  (:mod:`actsparse.hooks._triton`, which imports triton only when the kernel runs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from actsparse.core import KernelStrategy, hookimpl
from actsparse.hooks._kernels import (
    KERNEL_DTYPES,
    cpu_kernel_status,
    measure_crossover,
    sparse_linear,
    to_input_major,
)
from actsparse.hooks._triton import kernel_strategy as triton_kernel_strategy

__all__ = ["actsparse_kernels"]


def _any_module(module: Any) -> str | None:
    return None


def _cpu_supports(module: Any) -> str | None:
    if not isinstance(module, nn.Linear):
        return f"it is a {type(module).__name__}, and the kernel computes nn.Linear layers"
    weight = module.weight
    if weight.device.type != "cpu":
        return f"its weight is on {weight.device}, and the kernel runs on the CPU"
    if weight.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        return f"its weight is {str(weight.dtype).removeprefix('torch.')}, not one of {names}"
    return None


def _cpu_available() -> str | None:
    status = cpu_kernel_status()
    return None if status.available else status.reason


def _cpu_apply(module: nn.Linear, threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    weight_t = to_input_major(module)  # once; the parameter becomes its transposed view
    bias = None if module.bias is None else module.bias.detach()

    def run(x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, weight_t, bias, threshold)

    return run


def _cpu_crossover(module: nn.Linear, sparsity: float) -> int:
    return measure_crossover(module.in_features, module.out_features, module.weight.dtype, sparsity)


@hookimpl
def actsparse_kernels() -> list[KernelStrategy]:
    return [
        KernelStrategy(
            name="dense",
            supports=_any_module,
            description="zero |x| <= t with one hardshrink in a pre-hook, then the layer "
            "(the default)",
        ),
        KernelStrategy(
            name="cpu_sparse",
            supports=_cpu_supports,
            apply=_cpu_apply,
            available=_cpu_available,
            crossover=_cpu_crossover,
            description="nn.Linear on the CPU (float32, bfloat16): skips the weight rows of "
            "zeroed inputs; compiled on first use",
        ),
        triton_kernel_strategy(),
    ]
