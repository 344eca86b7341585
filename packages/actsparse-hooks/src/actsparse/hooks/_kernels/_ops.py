"""``actsparse::sparse_linear``: threshold mode's linear layer as a torch custom op.

``sparse_linear(x, weight_t, bias, threshold)`` computes
``F.linear(F.hardshrink(x, threshold), weight_t.T, bias)``: input entries with
``|x| <= threshold`` are zeroed, the others (NaN and inf included) are kept,
then the layer is applied. ``weight_t`` is the weight in input-major layout,
``(in_features, out_features)`` (see :func:`to_input_major`).

On CPU tensors of dtype float32 or bfloat16 the op runs the compiled
zero-skipping kernel, which reads only the weight rows of kept inputs; if the
kernel cannot be built it raises :class:`KernelUnavailableError` (check
:func:`cpu_kernel_status` first). Every other dtype (float16, float64) and
every other device computes the dense reference.

The op has a fake implementation, so ``torch.compile(fullgraph=True)`` traces
it as one node, and an autograd formula (that of hardshrink and linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from actsparse.core import ConfigError
from actsparse.hooks._kernels._build import NAMESPACE, require_cpu_kernel

__all__ = [
    "KERNEL_DTYPES",
    "OP_NAME",
    "backward",
    "check_arguments",
    "setup_context",
    "sparse_linear",
    "sparse_linear_reference",
]

OP_NAME = "actsparse::sparse_linear"
#: the dtypes the compiled kernel runs; others take the dense reference
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def sparse_linear_reference(
    x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float
) -> Tensor:
    """The dense computation the op stands for: hardshrink, then ``F.linear`` on ``weight_t.T``."""
    return F.linear(F.hardshrink(x, threshold), weight_t.T, bias)


def check_arguments(
    x: Tensor, weight_t: Tensor, bias: Tensor | None, *, op: str = "sparse_linear"
) -> None:
    """Refuse arguments that no zero-skipping linear op accepts, naming ``op``."""
    if x.dim() < 1:
        raise ConfigError(f"{op}: x must have a feature dimension, got shape {x.shape}")
    if weight_t.dim() != 2:
        raise ConfigError(
            f"{op}: weight_t must be 2-D (in_features, out_features), got {weight_t.shape}"
        )
    if x.shape[-1] != weight_t.shape[0]:
        raise ConfigError(
            f"{op}: x has {x.shape[-1]} features but weight_t is {tuple(weight_t.shape)} "
            "(in_features, out_features); pass the input-major weight, linear.weight.T"
        )
    if bias is not None and tuple(bias.shape) != (weight_t.shape[1],):
        raise ConfigError(
            f"{op}: bias must have shape ({weight_t.shape[1]},), got {tuple(bias.shape)}"
        )
    tensors = [x, weight_t] if bias is None else [x, weight_t, bias]
    if len({t.dtype for t in tensors}) != 1:
        raise ConfigError(
            f"{op}: x, weight_t and bias must share one dtype, got "
            + ", ".join(str(t.dtype) for t in tensors)
        )
    if len({t.device for t in tensors}) != 1:
        raise ConfigError(
            f"{op}: x, weight_t and bias must be on one device, got "
            + ", ".join(str(t.device) for t in tensors)
        )


_SCHEMA = "sparse_linear(Tensor x, Tensor weight_t, Tensor? bias, float threshold) -> Tensor"
# A fragment: other modules may add operators to the actsparse namespace.
_library = torch.library.Library("actsparse", "FRAGMENT")  # type: ignore[no-untyped-call]
_library.define(_SCHEMA)  # type: ignore[no-untyped-call]
_op = torch.ops.actsparse.sparse_linear.default


def sparse_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """``F.linear(F.hardshrink(x, threshold), weight_t.T, bias)``, skipping the zeroed inputs.

    Calls the torch operator ``torch.ops.actsparse.sparse_linear``. ``x`` has
    shape ``(*, in_features)`` and any strides; ``weight_t`` is
    ``(in_features, out_features)``, contiguous for speed (it is copied
    otherwise); ``bias`` is ``(out_features,)`` or ``None``. An input entry is
    kept iff ``not |x| <= threshold`` (the threshold rounded to x's dtype, as
    hardshrink does), so NaN and inf entries propagate as in the dense
    product. The result equals :func:`sparse_linear_reference` up to the
    order of the float sums; with non-finite *weights* it may differ, since a
    skipped input never multiplies its row.

    Raises :class:`~actsparse.core.ConfigError` for shapes, dtypes or devices
    that do not fit together, and :class:`KernelUnavailableError` (a
    ``ConfigError``) for float32 or bfloat16 CPU tensors when the kernel could
    not be built.
    """
    y: Tensor = _op(x, weight_t, bias, threshold)
    return y


def _kernel_cpu(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    check_arguments(x, weight_t, bias)
    if x.dtype not in KERNEL_DTYPES:
        return sparse_linear_reference(x, weight_t, bias, threshold)
    require_cpu_kernel()
    # The compiled operator reshapes x and makes x, weight_t and bias contiguous.
    kernel = getattr(torch.ops, NAMESPACE).sparse_linear_cpu.default
    y: Tensor = kernel(x, weight_t, bias, threshold)
    return y


def _kernel_other(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    check_arguments(x, weight_t, bias)
    return sparse_linear_reference(x, weight_t, bias, threshold)


def _fake(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    check_arguments(x, weight_t, bias)
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


torch.library.impl(OP_NAME, "CPU", _kernel_cpu, lib=_library)
# Every other device: the dense reference (the kernel is CPU code).
torch.library.impl(OP_NAME, "CompositeExplicitAutograd", _kernel_other, lib=_library)
torch.library.register_fake(OP_NAME, _fake, lib=_library)


# ------------------------------------------------------------------ autograd


def setup_context(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[Tensor, Tensor, Tensor | None, float],
    output: Tensor,
) -> None:
    x, weight_t, bias, threshold = inputs
    ctx.save_for_backward(x, weight_t)
    ctx.threshold = threshold  # type: ignore[attr-defined]
    ctx.has_bias = bias is not None  # type: ignore[attr-defined]


def backward(
    ctx: torch.autograd.function.FunctionCtx, grad: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    x, weight_t = ctx.saved_tensors  # type: ignore[attr-defined]
    threshold: float = ctx.threshold  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    grad_x = grad_weight_t = grad_bias = None
    if needs[0]:
        grad_x = torch.ops.aten.hardshrink_backward(grad @ weight_t.T, x, threshold)
    if needs[1]:
        shrunk = F.hardshrink(x, threshold).reshape(-1, x.shape[-1])
        grad_weight_t = shrunk.T @ grad.reshape(-1, grad.shape[-1])
    if needs[2] and ctx.has_bias:  # type: ignore[attr-defined]
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_weight_t, grad_bias, None


torch.library.register_autograd(OP_NAME, backward, setup_context=setup_context, lib=_library)
