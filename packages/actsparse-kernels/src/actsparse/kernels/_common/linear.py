"""What the kernels for ``nn.Linear`` layers share: the support check and ``apply``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from actsparse.kernels._common.layout import to_input_major

__all__ = ["Direct", "dtype_names", "linear_apply", "linear_support"]

#: ``op(x, weight_t, bias, threshold) -> y``, as :func:`~actsparse.kernels.sparse_linear`.
ThresholdOp = Callable[[Tensor, Tensor, "Tensor | None", float], Tensor]


@attrs.frozen
class Direct:
    """A way past the custom op's Python layers for calls that need no autograd.

    ``kernel()`` gives the compiled operator that the op's own implementation
    calls (it checks its arguments itself, and has a fake implementation for
    ``torch.compile``), or None when it cannot run here. :func:`linear_apply`
    calls it directly when grad mode is off (or nothing requires a gradient),
    outside ``torch.export``, for inputs on ``device_type`` whose dtype is the
    weight's and one of ``dtypes``; every other call goes through the op. At one
    token the op's Python layers (the dispatcher's Python kernel, the argument
    checks, the autograd wrapper) cost tens of microseconds, as much as a small
    layer's whole product, and a compiled graph pays them too. An exported
    program keeps the op, the one node that :mod:`actsparse.kernels` documents.
    """

    kernel: Callable[[], ThresholdOp | None]
    device_type: str
    dtypes: tuple[torch.dtype, ...]


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


def linear_apply(
    op: ThresholdOp, *, direct: Direct | None = None
) -> Callable[[nn.Linear, float], Callable[[Tensor], Tensor]]:
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

    With ``direct``, a call that needs no autograd and is not exported runs the
    compiled operator without the op's Python layers (:class:`Direct`), eager
    or under ``torch.compile``: the same function of the same arguments, so the
    same result.
    """

    def apply(module: nn.Linear, threshold: float) -> Callable[[Tensor], Tensor]:
        to_input_major(module)
        kernel = None if direct is None else direct.kernel()
        if kernel is None or direct is None:

            def run(x: Tensor) -> Tensor:
                return op(x, _input_major(module), module.bias, threshold)

            return run
        device_type, dtypes = direct.device_type, direct.dtypes

        def run_direct(x: Tensor) -> Tensor:
            weight_t = _input_major(module)
            bias = module.bias
            if (
                x.dtype is weight_t.dtype
                and x.dtype in dtypes
                and x.ndim >= 1
                and x.shape[-1] == weight_t.shape[0]  # else the op's checks name the fault
                and x.device.type == device_type
                and not torch.compiler.is_exporting()
                and not (
                    torch.is_grad_enabled()
                    and (
                        x.requires_grad
                        or weight_t.requires_grad
                        or (bias is not None and bias.requires_grad)
                    )
                )
            ):
                return kernel(x, weight_t, bias, threshold)
            return op(x, weight_t, bias, threshold)

        return run_direct

    return apply


def _input_major(module: nn.Linear) -> Tensor:
    """``module.weight.T``, contiguous: the weight is re-stored input-major first if it was
    replaced or re-laid out since the last call."""
    weight_t = module.weight.T
    if not weight_t.is_contiguous():
        to_input_major(module)
        weight_t = module.weight.T
    return weight_t
