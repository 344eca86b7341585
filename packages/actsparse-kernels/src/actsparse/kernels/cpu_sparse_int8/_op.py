"""``actsparse::sparse_linear_int8``: the int8 weight-only zero-skipping linear op.

The weight is quantized symmetrically, one scale per output channel, and
stored input-major: ``qweight`` is int8 ``(in_features, out_features)``,
``scales`` float32 ``(out_features,)``, and the weight it stands for is
``w[j, i] = qweight[i, j] * scales[j]``. The op computes
``F.linear(F.hardshrink(x, threshold), w, bias)`` on float32 inputs, reading
only the rows of ``qweight`` whose input is kept; above a few tokens it
dequantizes slabs of columns and multiplies them with torch's matrix product.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from actsparse.kernels._common.build import NAMESPACE, CppExtension
from actsparse.kernels._common.quantized import (
    QuantizedFormat,
    QuantizedWeights,
    define_quantized_op,
    isa_status,
)
from actsparse.kernels._common.status import KernelStatus

__all__ = [
    "EXTENSION",
    "FORMAT",
    "OP_NAME",
    "dequantize",
    "int8_kernel_status",
    "quantize",
    "sparse_linear_int8",
]

OP_NAME = "actsparse::sparse_linear_int8"
_HERE = Path(__file__).parent
#: the C++ kernel, compiled on first use
EXTENSION = CppExtension(
    "cpu_sparse_int8",
    sources=[_HERE / "int8_linear.cpp"],
    ops=["int8_linear_cpu", "int8_dequantize_cpu", "int8_isa"],
    headers=[_HERE.parent / "_common" / "quantized_kernel.h"],
)

#: the largest magnitude of a quantized value
LEVELS = 127
#: rows of the weight quantized at a time (bounds the temporary memory)
_CHUNK_ROWS = 1024


def int8_kernel_status(*, build: bool = True) -> KernelStatus:
    """Whether the int8 kernel is available, and the reason (which vector path it runs)."""
    return isa_status(EXTENSION, "int8_isa", build=build)


def _short_mantissa(scale: Tensor) -> Tensor:
    """``scale`` (float32, >= 0) rounded to 16 significant bits, so that ``q * scale`` is exact
    for every int8 ``q`` and quantizing the dequantized weight gives it back."""
    bits = scale.view(torch.int32)
    rounded = (bits + (1 << 7)) & ~((1 << 8) - 1)
    return rounded.view(torch.float32)


def quantize(weight: Tensor) -> QuantizedWeights:
    """The float32 ``(out, in)`` weight as int8, one scale per output channel (symmetric)."""
    out_features, in_features = weight.shape
    amax = weight.abs().amax(dim=1) if in_features else weight.new_zeros(out_features)
    scales = _short_mantissa((amax / LEVELS).to(torch.float32).contiguous())
    inverse = torch.where(scales > 0, 1.0 / scales, 0.0)
    qweight = torch.empty((in_features, out_features), dtype=torch.int8)
    for start in range(0, in_features, _CHUNK_ROWS):
        rows = weight[:, start : start + _CHUNK_ROWS].T * inverse
        qweight[start : start + _CHUNK_ROWS] = rows.round_().clamp_(-LEVELS, LEVELS)
    return QuantizedWeights(qweight, scales, None, in_features, out_features)


def dequantize(weights: QuantizedWeights) -> Tensor:
    """The float32 ``(out, in)`` weight that ``weights`` stand for."""
    return (weights.qweight.T.to(torch.float32) * weights.scales[:, None]).contiguous()


def _kernel_cpu(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    threshold: float,
    out_features: int,
) -> Tensor:
    EXTENSION.require()
    kernel = getattr(torch.ops, NAMESPACE).int8_linear_cpu.default
    y: Tensor = kernel(x, qweight, scales, bias, threshold)
    return y


_op = define_quantized_op("sparse_linear_int8", _kernel_cpu, dequantize)


def sparse_linear_int8(
    x: Tensor, weights: QuantizedWeights, bias: Tensor | None, threshold: float
) -> Tensor:
    """``F.linear(F.hardshrink(x, threshold), dequantize(weights), bias)``, skipping the
    rows of zeroed inputs; ``x`` float32 ``(*, in_features)``."""
    y: Tensor = _op(x, weights.qweight, weights.scales, None, bias, threshold, weights.out_features)
    return y


#: how the kernel stores and computes a weight
FORMAT = QuantizedFormat(name="cpu_sparse_int8", quantize=quantize, dequantize=dequantize, op=_op)
