"""``actsparse::sparse_linear_int4``: the 4-bit weight-only zero-skipping linear op.

The weight is stored input-major and quantized group-wise along the output
dimension inside each input row: row ``i`` is cut into groups of
:data:`GROUP_SIZE` consecutive outputs, and group ``g`` has a bfloat16 scale
``d`` and an integer zero point ``z`` in ``[0, 15]``, so that
``w[j, i] = d[i, g] * (q[i, j] - z[i, g])`` with ``q`` in ``[0, 15]``, two
values per byte. ``qweight`` is uint8 ``(in, out_pad / 2)``, ``scales``
bfloat16 ``(in, out_pad / 32)``, ``zeros`` uint8 ``(in, out_pad / 32)``,
where ``out_pad`` is ``out_features`` rounded up to 32: 0.59 bytes per
weight. A zeroed input skips its row's bytes, scales and zero points.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from actsparse.core import ConfigError
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
    "GROUP_SIZE",
    "OP_NAME",
    "dequantize",
    "int4_kernel_status",
    "quantize",
    "sparse_linear_int4",
]

OP_NAME = "actsparse::sparse_linear_int4"
_HERE = Path(__file__).parent
#: the C++ kernel, compiled on first use
EXTENSION = CppExtension(
    "cpu_sparse_int4",
    sources=[_HERE / "int4_linear.cpp"],
    ops=["int4_linear_cpu", "int4_dequantize_cpu", "int4_quantize_cpu", "int4_isa"],
    headers=[_HERE.parent / "_common" / "quantized_kernel.h"],
)

#: consecutive outputs of one input row that share a scale and a zero point
GROUP_SIZE = 32


def int4_kernel_status(*, build: bool = True) -> KernelStatus:
    """Whether the int4 kernel is available, and the reason (which vector path it runs)."""
    return isa_status(EXTENSION, "int4_isa", build=build)


def quantize(weight: Tensor) -> QuantizedWeights:
    """The float32 ``(out, in)`` weight as 4-bit groups of 32 outputs per input row.

    For each group the step sizes ``range / s`` for ``s`` in 15, 14, 13 and 12
    (``range = max(hi, 0) - min(lo, 0)``, rounded to bfloat16) are tried, each
    with its zero point ``round(-lo / step)``; the one with the smallest
    squared error wins. A weight already on such a grid (a dequantized one)
    finds its own grid again. Runs in the compiled kernel, on torch's threads.
    """
    EXTENSION.require()
    out_features, in_features = weight.shape
    quantize_cpu = getattr(torch.ops, NAMESPACE).int4_quantize_cpu.default
    qweight, scales, zeros = quantize_cpu(weight.T.to(torch.float32).contiguous())
    return QuantizedWeights(qweight, scales, zeros, in_features, out_features)


def dequantize(weights: QuantizedWeights) -> Tensor:
    """The float32 ``(out, in)`` weight that ``weights`` stand for."""
    packed, scales, zeros = weights.qweight, weights.scales, weights.zeros
    if zeros is None:
        raise ConfigError("cpu_sparse_int4: 4-bit weights need their zero points")
    n, groups = scales.shape
    grouped = packed.reshape(n, groups, GROUP_SIZE // 2)
    q = torch.cat((grouped & 0x0F, grouped >> 4), dim=-1).to(torch.float32)
    values = (q - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return values.reshape(n, groups * GROUP_SIZE)[:, : weights.out_features].T.contiguous()


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
    kernel = getattr(torch.ops, NAMESPACE).int4_linear_cpu.default
    y: Tensor = kernel(x, qweight, scales, zeros, bias, threshold, out_features)
    return y


_op = define_quantized_op("sparse_linear_int4", _kernel_cpu, dequantize)


def sparse_linear_int4(
    x: Tensor, weights: QuantizedWeights, bias: Tensor | None, threshold: float
) -> Tensor:
    """``F.linear(F.hardshrink(x, threshold), dequantize(weights), bias)``, skipping the
    rows of zeroed inputs; ``x`` float32 ``(*, in_features)``."""
    y: Tensor = _op(
        x, weights.qweight, weights.scales, weights.zeros, bias, threshold, weights.out_features
    )
    return y


#: how the kernel stores and computes a weight
FORMAT = QuantizedFormat(name="cpu_sparse_int4", quantize=quantize, dequantize=dequantize, op=_op)
