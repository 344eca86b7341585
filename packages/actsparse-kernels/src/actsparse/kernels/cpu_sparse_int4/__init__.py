"""``cpu_sparse_int4``: zero-skipping linear layers on 4-bit weights, on the CPU (lossy).

Applied to a float32 ``nn.Linear``, the kernel quantizes its weight to 4 bits,
stored input-major, in groups of 32 consecutive outputs inside each input row
with a bfloat16 scale and an integer zero point per group (so a zeroed input
skips its row), and keeps only that: 0.59 bytes per weight in place of 4. Activations stay float32
and every sum is accumulated in float32. It is lossy
(:data:`TOLERANCE` against the dense layer on the dequantized weight), so
``kernel="auto"`` never picks it: name it (``squash_mask(kernel="cpu_sparse_int4")``,
``set_kernel``, ``sparsify(kernel=...)``, ``--kernel``). See
:mod:`actsparse.kernels._common.quantized` for what the layer's ``weight`` and
``state_dict()`` hold meanwhile and what ``set_kernel("dense")`` gives back.
"""

from __future__ import annotations

from actsparse.core import Tolerance
from actsparse.kernels._common.quantized import quantized_kernel
from actsparse.kernels.cpu_sparse_int4._op import (
    EXTENSION,
    FORMAT,
    GROUP_SIZE,
    OP_NAME,
    dequantize,
    int4_kernel_status,
    quantize,
    sparse_linear_int4,
)

__all__ = [
    "EXTENSION",
    "FORMAT",
    "GROUP_SIZE",
    "KERNEL",
    "KERNEL_NAME",
    "OP_NAME",
    "TOLERANCE",
    "dequantize",
    "int4_kernel_status",
    "quantize",
    "sparse_linear_int4",
]

#: the name users pass as ``kernel``
KERNEL_NAME = "cpu_sparse_int4"

#: against F.linear on the dequantized weight: float32 sums in another order,
#: each input multiplied by its group's scale before the sum
TOLERANCE = Tolerance(rtol=1e-5, atol=0.0)


#: the ``cpu_sparse_int4`` kernel
KERNEL = quantized_kernel(
    FORMAT,
    int4_kernel_status,
    TOLERANCE,
    "nn.Linear on the CPU (float32) with 4-bit weights in groups of 32 outputs "
    "(scale and zero point): skips the weight rows of zeroed inputs; lossy, only when named",
)
