"""``actsparse::sparse_linear``: threshold mode's linear layer on the CPU, as a torch custom op.

``sparse_linear(x, weight_t, bias, threshold)`` computes
``F.linear(F.hardshrink(x, threshold), weight_t.T, bias)``: input entries with
``|x| <= threshold`` are zeroed, the others (NaN and inf included) are kept,
then the layer is applied. ``weight_t`` is the weight in input-major layout,
``(in_features, out_features)`` (see :func:`~actsparse.kernels.to_input_major`).

On CPU tensors of dtype float32 or bfloat16 the op runs the compiled
zero-skipping kernel (``sparse_linear.cpp`` beside this file), which reads
only the weight rows of kept inputs; if the kernel cannot be built it raises
:class:`~actsparse.kernels.KernelUnavailableError` (check
:func:`cpu_kernel_status` first). Every other dtype (float16, float64) and
every other device computes the dense reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from actsparse.kernels._common.build import NAMESPACE, CppExtension
from actsparse.kernels._common.reference import (
    check_arguments,
    define_op,
    sparse_linear_reference,
)
from actsparse.kernels._common.status import KernelStatus

__all__ = [
    "EXTENSION",
    "KERNEL_DTYPES",
    "OP_NAME",
    "compiled_kernel",
    "cpu_kernel_status",
    "sparse_linear",
]

OP_NAME = "actsparse::sparse_linear"
#: the dtypes the compiled kernel runs; others take the dense reference
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
#: the C++ kernel, compiled on first use
EXTENSION = CppExtension(
    "cpu_sparse",
    sources=[Path(__file__).with_name("sparse_linear.cpp")],
    ops=["sparse_linear_cpu", "parallel_width"],
)


def cpu_kernel_status(*, build: bool = True) -> KernelStatus:
    """Whether the zero-skipping CPU kernel is available, and the reason
    (:meth:`CppExtension.status <actsparse.kernels._common.build.CppExtension.status>`)."""
    return EXTENSION.status(build=build)


def compiled_kernel() -> Callable[[Tensor, Tensor, Tensor | None, float], Tensor] | None:
    """The compiled operator that the op runs on float32 and bfloat16 CPU tensors, or None
    if it could not be built. It checks its own arguments (a ``RuntimeError`` otherwise)."""
    if not cpu_kernel_status().available:
        return None
    kernel: Callable[[Tensor, Tensor, Tensor | None, float], Tensor] = getattr(
        torch.ops, NAMESPACE
    ).sparse_linear_cpu.default
    _trace_kernel()
    return kernel


_traced: list[bool] = []


def _trace_kernel() -> None:
    """Give the compiled operator a fake implementation (once), so that ``torch.compile``
    traces a direct call as one node of the graph."""
    if _traced:
        return
    torch.library.register_fake(f"{NAMESPACE}::sparse_linear_cpu", _fake_kernel, lib=_fake_library)
    _traced.append(True)


_fake_library = torch.library.Library(NAMESPACE, "FRAGMENT")  # type: ignore[no-untyped-call]


def _fake_kernel(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    check_arguments(x, weight_t, bias, op="sparse_linear_cpu")
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def _kernel_cpu(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    if x.dtype not in KERNEL_DTYPES:
        return sparse_linear_reference(x, weight_t, bias, threshold)
    EXTENSION.require()
    # The compiled operator reshapes x and makes x, weight_t and bias contiguous.
    kernel = getattr(torch.ops, NAMESPACE).sparse_linear_cpu.default
    y: Tensor = kernel(x, weight_t, bias, threshold)
    return y


_op = define_op(
    "sparse_linear",
    {
        "CPU": _kernel_cpu,
        # every other device: the dense reference (the kernel is CPU code)
        "CompositeExplicitAutograd": sparse_linear_reference,
    },
)


def sparse_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """``F.linear(F.hardshrink(x, threshold), weight_t.T, bias)``, skipping the zeroed inputs.

    Calls the torch operator ``torch.ops.actsparse.sparse_linear``. ``x`` has
    shape ``(*, in_features)`` and any strides; ``weight_t`` is
    ``(in_features, out_features)``, contiguous for speed (it is copied
    otherwise); ``bias`` is ``(out_features,)`` or ``None``. An input entry is
    kept iff ``not |x| <= threshold`` (the threshold rounded to x's dtype, as
    hardshrink does), so NaN and inf entries propagate as in the dense
    product. The result equals :func:`~actsparse.kernels.sparse_linear_reference`
    up to the order of the float sums; with non-finite *weights* it may differ,
    since a skipped input never multiplies its row.

    Raises :class:`~actsparse.core.ConfigError` for shapes, dtypes or devices
    that do not fit together, and :class:`~actsparse.kernels.KernelUnavailableError`
    (a ``ConfigError``) for float32 or bfloat16 CPU tensors when the kernel could
    not be built.
    """
    y: Tensor = _op(x, weight_t, bias, threshold)
    return y
