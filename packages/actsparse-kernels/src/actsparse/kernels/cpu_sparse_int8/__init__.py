"""``cpu_sparse_int8``: zero-skipping linear layers on int8 weights, on the CPU (lossy).

Applied to a float32 ``nn.Linear``, the kernel quantizes its weight to int8,
symmetric with one scale per output channel, stored input-major (one row of
``out_features`` bytes per input, so a zeroed input skips its row), and keeps
only that: about 1 byte per weight in place of 4. Activations stay float32
and every sum is accumulated in float32. It is lossy
(:data:`TOLERANCE` against the dense layer on the dequantized weight), so
``kernel="auto"`` never picks it: name it (``squash_mask(kernel="cpu_sparse_int8")``,
``set_kernel``, ``sparsify(kernel=...)``, ``--kernel``). See
:mod:`actsparse.kernels._common.quantized` for what the layer's ``weight`` and
``state_dict()`` hold meanwhile and what ``set_kernel("dense")`` gives back.
"""

from __future__ import annotations

from actsparse.core import Tolerance
from actsparse.kernels._common.quantized import quantized_kernel
from actsparse.kernels.cpu_sparse_int8._op import (
    EXTENSION,
    FORMAT,
    OP_NAME,
    dequantize,
    int8_kernel_status,
    quantize,
    sparse_linear_int8,
)

__all__ = [
    "EXTENSION",
    "FORMAT",
    "KERNEL",
    "KERNEL_NAME",
    "OP_NAME",
    "TOLERANCE",
    "dequantize",
    "int8_kernel_status",
    "quantize",
    "sparse_linear_int8",
]

#: the name users pass as ``kernel``
KERNEL_NAME = "cpu_sparse_int8"

#: against F.linear on the dequantized weight: float32 sums in another order,
#: and the scale applied once per output after the sum
TOLERANCE = Tolerance(rtol=1e-5, atol=0.0)


#: the ``cpu_sparse_int8`` kernel
KERNEL = quantized_kernel(
    FORMAT,
    int8_kernel_status,
    TOLERANCE,
    "nn.Linear on the CPU (float32) with int8 weights, one scale per output "
    "channel: skips the weight rows of zeroed inputs; lossy, only when named",
)
