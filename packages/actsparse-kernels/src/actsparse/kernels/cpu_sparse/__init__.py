"""``cpu_sparse``: the zero-skipping linear layer on the CPU (float32, bfloat16).

In threshold mode a layer's input is zeroed where ``|x| <= threshold`` and the
dense layer runs. :func:`sparse_linear` (the torch custom op
``actsparse::sparse_linear``) computes the same thing while skipping the
weight rows of zeroed inputs: at one token, where a linear layer is bound by
memory bandwidth, that is where the speed is. It needs the weight stored
input-major (:func:`~actsparse.kernels.to_input_major`) and a C++ kernel that
is compiled on first use (:func:`cpu_kernel_status` says whether that worked,
and why not). :func:`measure_crossover` measures up to how many tokens it pays.
:data:`KERNEL` is the record that :mod:`actsparse.kernels.plugin` registers.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from actsparse.core import ConfigError, KernelStrategy
from actsparse.kernels._common.crossover import (
    CrossoverCache,
    check_crossover_arguments,
    last_winning_count,
    num_threads,
    perf_counter_timer,
    sparse_faster,
)
from actsparse.kernels._common.linear import Direct, linear_apply, linear_support
from actsparse.kernels._common.reference import sparse_linear_reference
from actsparse.kernels.cpu_sparse._op import (
    EXTENSION,
    KERNEL_DTYPES,
    OP_NAME,
    compiled_kernel,
    cpu_kernel_status,
    sparse_linear,
)

__all__ = [
    "KERNEL_NAME",
    "EXTENSION",
    "KERNEL",
    "KERNEL_DTYPES",
    "OP_NAME",
    "clear_crossover_cache",
    "cpu_kernel_status",
    "measure_crossover",
    "sparse_linear",
]

#: a timed sample runs the call in a loop until it lasts at least this long: at 0.2 ms
#: the verdict for a 576 x 576 layer at one token flipped from one measurement to the
#: next on this project's machine; at 2 ms it held
MIN_SAMPLE_SECONDS = 2e-3
#: the measurement cycles through copies of the weight that add up to at least this many
#: bytes (at most :data:`MAX_COPIES`), so that each call reads its weight from beyond the
#: core's own caches, as a layer of a many-layer model does when it decodes a token
COLD_BYTES = 32 * 2**20
MAX_COPIES = 64

_cache = CrossoverCache()


def measure_crossover(
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    sparsity: float,
    *,
    threads: int | None = None,
    max_tokens: int = 64,
) -> int:
    """The largest token count at which the sparse kernel is faster than the dense layer.

    Times the compiled operator as a layer calls it without autograd (directly,
    as :func:`sparse_linear` computes it) against its dense reference
    (hardshrink and ``F.linear`` on the same input-major weight) on synthetic
    inputs of the
    given ``sparsity`` (the fraction of entries zeroed), at 1, 2, 4, 8, ...
    tokens up to ``max_tokens``, and returns the last count at which the
    sparse op won before it first lost: 0 if it never won. The weights are
    cold: each call reads the next of several copies of the weight that
    together take at least :data:`COLD_BYTES` (32 MiB, at most 64 copies), so
    neither path finds its weight in the core's caches. That is how a layer
    runs inside a model whose layers do not all fit there, decoding one token
    after another; a hot-cache measurement favours the dense product on small
    layers. Each count's
    verdict is the median of three interleaved pairs of samples, after one
    warm-up call of each; a sample repeats the call until it lasts
    :data:`MIN_SAMPLE_SECONDS` (2 ms). The cost per count tried is about
    16 ms for small layers, and eight calls of the layer (one to a few
    seconds) for a 4096 x 11008 float32 layer
    (which also allocates its weights once per measurement; small layers
    allocate up to 32 MiB of copies for the measurement's duration).

    ``threads`` sets :func:`torch.set_num_threads` during the measurement
    (restored afterwards); ``None`` measures at the current setting. Results
    are cached in this process by (shape, dtype, sparsity rounded to 0.01,
    threads, max_tokens). Dtypes the kernel does not run, and a kernel that is
    unavailable (:func:`cpu_kernel_status`), give 0.
    """
    check_crossover_arguments("measure_crossover", in_features, out_features, sparsity, max_tokens)
    if threads is not None and threads < 1:
        raise ConfigError(f"measure_crossover: threads must be >= 1, got {threads}")
    width = torch.get_num_threads() if threads is None else threads
    level = round(sparsity, 2)
    key = (in_features, out_features, dtype, level, width, max_tokens)

    def measure() -> int:
        if dtype not in KERNEL_DTYPES or not cpu_kernel_status().available:
            return 0
        with num_threads(width), torch.no_grad():
            return _measure(in_features, out_features, dtype, level, max_tokens)

    return _cache.get(key, measure)


def clear_crossover_cache() -> None:
    """Forget every measured crossover (they are measured again on the next call)."""
    _cache.clear()


def _measure(
    in_features: int, out_features: int, dtype: torch.dtype, sparsity: float, max_tokens: int
) -> int:
    generator = torch.Generator().manual_seed(0)
    size = in_features * out_features * torch.empty((), dtype=dtype).element_size()
    copies = max(1, min(MAX_COPIES, -(-COLD_BYTES // max(size, 1))))
    # The speed of neither path depends on the weights' values.
    weights = [torch.full((in_features, out_features), 0.01, dtype=dtype) for _ in range(copies)]
    # |x| is uniform on [0, 1): the entries with |x| <= sparsity are zeroed.
    x = (torch.rand(max_tokens, in_features, generator=generator) * 2 - 1).to(dtype)
    return last_winning_count(lambda tokens: _wins(x[:tokens], weights, sparsity), max_tokens)


def _wins(x: Tensor, weights: list[Tensor], threshold: float) -> bool:
    """Whether the sparse kernel beats the dense reference on ``x``, each call on the next
    of ``weights``. The kernel is timed as a decoding step runs it, the compiled operator
    called directly (:class:`~actsparse.kernels._common.linear.Direct`); through the
    custom op's Python layers it pays about 10 µs more per call, which at one token
    decided small layers for the dense path."""
    turn = itertools.cycle(weights)
    kernel = compiled_kernel() or sparse_linear
    return sparse_faster(
        lambda: kernel(x, next(turn), None, threshold),
        lambda: sparse_linear_reference(x, next(turn), None, threshold),
        perf_counter_timer,
        min_sample_seconds=MIN_SAMPLE_SECONDS,
    )


# ------------------------------------------------------------------ the record


def _supports(module: Any) -> str | None:
    return linear_support(module, device_type="cpu", dtypes=KERNEL_DTYPES, where="on the CPU")


def _available() -> str | None:
    status = cpu_kernel_status()
    return None if status.available else status.reason


def _layer_crossover(module: nn.Linear, sparsity: float) -> int:
    return measure_crossover(module.in_features, module.out_features, module.weight.dtype, sparsity)


#: the name users pass as ``kernel``
KERNEL_NAME = "cpu_sparse"

#: the ``cpu_sparse`` kernel
KERNEL = KernelStrategy(
    name=KERNEL_NAME,
    supports=_supports,
    apply=linear_apply(
        sparse_linear, direct=Direct(compiled_kernel, device_type="cpu", dtypes=KERNEL_DTYPES)
    ),
    available=_available,
    crossover=_layer_crossover,
    description="nn.Linear on the CPU (float32, bfloat16): skips the weight rows of "
    "zeroed inputs; compiled on first use",
)
