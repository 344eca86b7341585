"""What the kernels for ``nn.Linear`` layers share: the support check and ``apply``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from actsparse.kernels._common.layout import to_input_major

__all__ = ["dtype_names", "linear_apply", "linear_support"]

#: ``op(x, weight_t, bias, threshold) -> y``, as :func:`~actsparse.kernels.sparse_linear`.
ThresholdOp = Callable[[Tensor, Tensor, "Tensor | None", float], Tensor]


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """``"float32, bfloat16"``: dtypes as messages name them."""
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def linear_support(
    module: Any, *, device_type: str, dtypes: tuple[torch.dtype, ...], where: str
) -> str | None:
    """None for an ``nn.Linear`` whose weight is on ``device_type`` in one of ``dtypes``,
    else why a kernel that runs ``where`` (``"on the CPU"``) cannot compute it."""
    if not isinstance(module, nn.Linear):
        return f"it is a {type(module).__name__}, and the kernel computes nn.Linear layers"
    weight = module.weight
    if weight.device.type != device_type:
        return f"its weight is on {weight.device}, and the kernel runs {where}"
    if weight.dtype not in dtypes:
        dtype = str(weight.dtype).removeprefix("torch.")
        return f"its weight is {dtype}, not one of {dtype_names(dtypes)}"
    return None


def linear_apply(op: ThresholdOp) -> Callable[[nn.Linear, float], Callable[[Tensor], Tensor]]:
    """A ``KernelStrategy.apply`` that computes an ``nn.Linear`` with ``op``.

    The returned function re-stores the layer's weight input-major once
    (:func:`~actsparse.kernels.to_input_major`: the parameter becomes its
    transposed view, one copy of the weight) and gives ``fn(x)``, the layer
    on ``x`` with ``|x| <= threshold`` zeroed.

    ``fn`` computes with the layer's parameters as they are at each call,
    never with a copy taken here: a weight or bias edited in place, replaced
    (``layer.weight = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``),
    moved to another dtype or device, or stored output-major again
    (:func:`~actsparse.kernels.to_output_major`) gives the same outputs as the
    dense layer, and gradients reach the weight and the bias. A weight that is
    no longer input-major is re-stored input-major at its next call (once; the
    op would otherwise copy it on every call).
    """

    def apply(module: nn.Linear, threshold: float) -> Callable[[Tensor], Tensor]:
        to_input_major(module)

        def run(x: Tensor) -> Tensor:
            weight_t = module.weight.T
            if not weight_t.is_contiguous():  # replaced or re-laid out since the last call
                to_input_major(module)
                weight_t = module.weight.T
            return op(x, weight_t, module.bias, threshold)

        return run

    return apply
