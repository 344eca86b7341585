"""``actsparse::triton_sparse_linear``: the Triton kernel as a torch custom op.

``triton_sparse_linear(x, weight_t, bias, threshold)`` computes
``F.linear(F.hardshrink(x, threshold), weight_t.T, bias)`` like
``actsparse::sparse_linear`` (same arguments, same meaning: ``weight_t`` is
the input-major weight, :func:`~actsparse.kernels.to_input_major`).

* CUDA tensors of dtype float16 or bfloat16: the Triton kernel, which reads
  only the weight rows of kept inputs. Without triton it raises
  :class:`~actsparse.kernels.KernelUnavailableError` (a ``ConfigError``).
* CPU tensors: the dense reference, unless Triton's interpreter is on
  (``TRITON_INTERPRET=1`` before the kernel was first used): then the same
  kernel runs, interpreted on the CPU, slowly. That is how the kernel is
  tested without a GPU.
* Every other dtype or device: the dense reference.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from actsparse.kernels._common.reference import define_op, sparse_linear_reference
from actsparse.kernels._common.status import KernelUnavailableError
from actsparse.kernels.triton_sparse._status import TRITON_DTYPES, interpreter_requested, status

__all__ = ["OP_NAME", "interpreted_kernels", "triton_sparse_linear"]

OP_NAME = "actsparse::triton_sparse_linear"
_KERNEL_MODULE = "actsparse.kernels.triton_sparse._kernel"


def _kernels() -> ModuleType:
    """The kernel module (it imports triton), or the error that says what is missing."""
    try:
        return importlib.import_module(_KERNEL_MODULE)
    except ImportError as exc:
        raise KernelUnavailableError(
            f"the Triton kernel is unavailable: {status().reason}"
        ) from exc


def interpreted_kernels() -> ModuleType | None:
    """The kernel module when Triton's interpreter runs it on CPU tensors, else None."""
    if not interpreter_requested():
        return None
    try:
        module = importlib.import_module(_KERNEL_MODULE)
    except ImportError:
        return None
    return module if module.INTERPRETED else None


def _kernel_cuda(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    if x.dtype not in TRITON_DTYPES:
        return sparse_linear_reference(x, weight_t, bias, threshold)
    kernels = _kernels()
    with torch.cuda.device(x.device):
        y: Tensor = kernels.run(x, weight_t, bias, threshold)
    return y


def _kernel_cpu(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    kernels = interpreted_kernels() if x.dtype in TRITON_DTYPES else None
    if kernels is None:
        return sparse_linear_reference(x, weight_t, bias, threshold)
    y: Tensor = kernels.run(x, weight_t, bias, threshold)
    return y


_op = define_op(
    "triton_sparse_linear",
    {
        "CUDA": _kernel_cuda,
        "CPU": _kernel_cpu,
        "CompositeExplicitAutograd": sparse_linear_reference,
    },
)


def triton_sparse_linear(
    x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float
) -> Tensor:
    """``F.linear(F.hardshrink(x, threshold), weight_t.T, bias)`` by the Triton kernel on CUDA.

    Calls the torch operator ``torch.ops.actsparse.triton_sparse_linear``.
    ``x`` is ``(*, in_features)`` with any strides, ``weight_t`` ``(in_features,
    out_features)`` (contiguous reads fastest; it is never copied), ``bias``
    ``(out_features,)`` or None. An input entry is kept iff ``not |x| <=
    threshold``, the threshold rounded to x's dtype as hardshrink rounds it,
    so NaN and inf inputs propagate as in the dense product; products are
    summed in float32. With non-finite *weights* the result may differ from
    the dense one, since a dropped input never multiplies its row.

    Raises :class:`~actsparse.core.ConfigError` for shapes, dtypes or devices
    that do not fit together, and :class:`~actsparse.kernels.KernelUnavailableError`
    for float16 or bfloat16 CUDA tensors when triton is not installed.
    """
    y: Tensor = _op(x, weight_t, bias, threshold)
    return y
