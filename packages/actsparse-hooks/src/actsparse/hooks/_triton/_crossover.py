"""Up to how many tokens the Triton kernel beats the dense layer on a GPU, measured.

As on the CPU (:func:`actsparse.hooks.measure_crossover`), skipping the
weight rows of zeroed inputs pays where the product is bound by memory
bandwidth, at one or a few tokens; cuBLAS wins with more. Where they cross
depends on the GPU, the shape, the dtype and the sparsity, so it is measured
with CUDA events, once per process and configuration.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from actsparse.core import ConfigError
from actsparse.hooks._kernels import sparse_linear_reference
from actsparse.hooks._triton._op import triton_sparse_linear
from actsparse.hooks._triton._status import TRITON_DTYPES, status

__all__ = ["clear_cuda_crossover_cache", "last_winning_count", "measure_cuda_crossover"]

#: interleaved repetitions per token count; the median of their ratios decides
REPEATS = 3
#: a timed sample runs the call in a loop until it lasts at least this long
MIN_SAMPLE_SECONDS = 1e-3

CacheKey = tuple[int, int, torch.dtype, float, int, int]
_cache: dict[CacheKey, int] = {}
_cache_lock = threading.Lock()


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
    if in_features < 1 or out_features < 1:
        raise ConfigError(
            f"measure_cuda_crossover: features must be >= 1, got {in_features}, {out_features}"
        )
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"measure_cuda_crossover: sparsity must lie in [0, 1], got {sparsity}")
    if max_tokens < 1:
        raise ConfigError(f"measure_cuda_crossover: max_tokens must be >= 1, got {max_tokens}")
    if dtype not in TRITON_DTYPES or not status().available:
        return 0
    where = torch.device("cuda" if device is None else device)
    if where.type != "cuda":
        raise ConfigError(f"measure_cuda_crossover: device must be a CUDA device, got {where}")
    index = where.index if where.index is not None else torch.cuda.current_device()
    key: CacheKey = (in_features, out_features, dtype, round(sparsity, 2), index, max_tokens)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    result = _measure(in_features, out_features, dtype, round(sparsity, 2), max_tokens, index)
    with _cache_lock:
        _cache[key] = result
    return result


def clear_cuda_crossover_cache() -> None:
    """Forget every measured crossover."""
    with _cache_lock:
        _cache.clear()


def last_winning_count(wins: Callable[[int], bool], max_tokens: int) -> int:
    """The last of 1, 2, 4, ... (up to ``max_tokens``) for which ``wins`` holds
    before it first fails; 0 if it fails at 1."""
    best = 0
    tokens = 1
    while tokens <= max_tokens:
        if not wins(tokens):
            break
        best = tokens
        tokens *= 2
    return best


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
        return last_winning_count(
            lambda tokens: _sparse_faster(x[:tokens], weight_t, sparsity), max_tokens
        )


def _sparse_faster(x: Tensor, weight_t: Tensor, threshold: float) -> bool:
    """Whether the Triton kernel beats the dense reference on ``x``: a warm-up call
    of each, then the median ratio of ``REPEATS`` interleaved pairs of timed samples."""

    def sparse() -> object:
        return triton_sparse_linear(x, weight_t, None, threshold)

    def dense() -> object:
        return sparse_linear_reference(x, weight_t, None, threshold)

    sparse()  # the first call of a shape compiles the kernel
    dense()
    inner = max(1, round(MIN_SAMPLE_SECONDS / max(_seconds(sparse, 1), _seconds(dense, 1))))
    ratios = []
    for rep in range(REPEATS):
        if rep % 2:
            dense_s = _seconds(dense, inner)
            ratios.append(dense_s / _seconds(sparse, inner))
        else:
            sparse_s = _seconds(sparse, inner)
            ratios.append(_seconds(dense, inner) / sparse_s)
    return statistics.median(ratios) > 1.0


def _seconds(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``fn`` on the GPU's clock (CUDA events around ``inner`` calls)."""
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1e3 / inner
