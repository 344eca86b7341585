"""Up to how many tokens the Triton kernel beats the dense layer on a GPU, measured.

The search is the one every kernel uses (:mod:`actsparse.kernels._common.crossover`),
timed with CUDA events: skipping the weight rows of zeroed inputs pays where
the product is bound by memory bandwidth, at one or a few tokens; cuBLAS wins
with more.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from actsparse.core import ConfigError
from actsparse.kernels._common.crossover import (
    CrossoverCache,
    check_crossover_arguments,
    last_winning_count,
    sparse_faster,
)
from actsparse.kernels._common.reference import sparse_linear_reference
from actsparse.kernels.triton_sparse._op import triton_sparse_linear
from actsparse.kernels.triton_sparse._status import TRITON_DTYPES, status

__all__ = ["clear_cuda_crossover_cache", "cuda_event_timer", "measure_cuda_crossover"]

#: a timed sample runs the call in a loop until it lasts at least this long
MIN_SAMPLE_SECONDS = 1e-3

_cache = CrossoverCache()


def measure_cuda_crossover(
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    sparsity: float,
    *,
    device: torch.device | str | int | None = None,
    max_tokens: int = 64,
) -> int:
    """The largest token count at which the Triton kernel beats the dense layer on a GPU.

    Times :func:`triton_sparse_linear` against its dense reference
    (hardshrink and ``F.linear`` on the same input-major weight, as the
    layer's dense path runs) on synthetic inputs of the given ``sparsity``, at
    1, 2, 4, ... tokens up to ``max_tokens``, with CUDA events; returns the
    last count at which the kernel won before it first lost (0: never). The
    first call of each count compiles the kernel for it (Triton caches that
    on disk). Results are cached in this process by (shape, dtype, sparsity
    rounded to 0.01, device, max_tokens). Dtypes other than float16 and
    bfloat16, and a kernel that cannot run here, give 0.
    """
    check_crossover_arguments(
        "measure_cuda_crossover", in_features, out_features, sparsity, max_tokens
    )
    if dtype not in TRITON_DTYPES or not status().available:
        return 0
    where = torch.device("cuda" if device is None else device)
    if where.type != "cuda":
        raise ConfigError(f"measure_cuda_crossover: device must be a CUDA device, got {where}")
    index = where.index if where.index is not None else torch.cuda.current_device()
    level = round(sparsity, 2)
    key = (in_features, out_features, dtype, level, index, max_tokens)
    return _cache.get(
        key, lambda: _measure(in_features, out_features, dtype, level, max_tokens, index)
    )


def clear_cuda_crossover_cache() -> None:
    """Forget every measured crossover."""
    _cache.clear()


def cuda_event_timer(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``fn`` on the GPU's clock (CUDA events around ``inner`` calls)."""
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1e3 / inner


def _measure(
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    sparsity: float,
    max_tokens: int,
    index: int,
) -> int:
    device = torch.device("cuda", index)
    with torch.no_grad(), torch.cuda.device(device):
        generator = torch.Generator(device=device).manual_seed(0)
        # The speed of neither path depends on the weights' values.
        weight_t = torch.full((in_features, out_features), 0.01, dtype=dtype, device=device)
        # |x| is uniform on [0, 1): the entries with |x| <= sparsity are zeroed.
        x = torch.rand(max_tokens, in_features, generator=generator, device=device) * 2 - 1
        x = x.to(dtype)
        return last_winning_count(lambda tokens: _wins(x[:tokens], weight_t, sparsity), max_tokens)


def _wins(x: Tensor, weight_t: Tensor, threshold: float) -> bool:
    """Whether the Triton kernel beats the dense reference on ``x``."""
    return sparse_faster(
        lambda: triton_sparse_linear(x, weight_t, None, threshold),
        lambda: sparse_linear_reference(x, weight_t, None, threshold),
        cuda_event_timer,
        min_sample_seconds=MIN_SAMPLE_SECONDS,
    )
