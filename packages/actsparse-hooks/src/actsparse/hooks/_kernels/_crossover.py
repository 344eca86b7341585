"""Up to how many tokens the zero-skipping kernel beats the dense layer, measured.

At one token a linear layer is bound by memory bandwidth and skipping the
weight rows of zeroed inputs pays; with more tokens the dense matrix product
reuses each weight many times and wins. Where the two cross depends on the
shape, the dtype, the sparsity, the thread count and the machine, so it is
measured, once per process and configuration, never per forward pass.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from actsparse.core import ConfigError
from actsparse.hooks._kernels._build import cpu_kernel_status
from actsparse.hooks._kernels._ops import KERNEL_DTYPES, sparse_linear, sparse_linear_reference

__all__ = ["clear_crossover_cache", "measure_crossover"]

#: interleaved repetitions per token count; the median of their ratios decides
REPEATS = 3
#: a timed sample runs the call in a loop until it lasts at least this long
MIN_SAMPLE_SECONDS = 2e-4

CacheKey = tuple[int, int, torch.dtype, float, int, int]
_cache: dict[CacheKey, int] = {}
_cache_lock = threading.Lock()


def measure_crossover(
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    sparsity: float,
    *,
    threads: int | None = None,
    max_tokens: int = 64,
) -> int:
    """The largest token count at which the sparse op is faster than the dense layer.

    Times :func:`sparse_linear` against its dense reference (hardshrink and
    ``F.linear`` on the same input-major weight) on synthetic inputs of the
    given ``sparsity`` (the fraction of entries zeroed), at 1, 2, 4, 8, ...
    tokens up to ``max_tokens``, and returns the last count at which the
    sparse op won before it first lost: 0 if it never won. Each count's
    verdict is the median of three interleaved pairs of samples, after one
    warm-up call of each: eight calls per count, so the cost is about eight
    times the layer's time per count tried. That is a few milliseconds for
    small layers and one to a few seconds for a 4096 x 11008 float32 layer
    (which also allocates its weights once per measurement).

    ``threads`` sets :func:`torch.set_num_threads` during the measurement
    (restored afterwards); ``None`` measures at the current setting. Results
    are cached in this process by (shape, dtype, sparsity rounded to 0.01,
    threads, max_tokens). Dtypes the kernel does not run, and a kernel that is
    unavailable (:func:`cpu_kernel_status`), give 0.
    """
    if in_features < 1 or out_features < 1:
        raise ConfigError(
            f"measure_crossover: features must be >= 1, got {in_features}, {out_features}"
        )
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"measure_crossover: sparsity must lie in [0, 1], got {sparsity}")
    if max_tokens < 1:
        raise ConfigError(f"measure_crossover: max_tokens must be >= 1, got {max_tokens}")
    if threads is not None and threads < 1:
        raise ConfigError(f"measure_crossover: threads must be >= 1, got {threads}")
    width = torch.get_num_threads() if threads is None else threads
    key: CacheKey = (in_features, out_features, dtype, round(sparsity, 2), width, max_tokens)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    if dtype not in KERNEL_DTYPES or not cpu_kernel_status().available:
        result = 0
    else:
        with _num_threads(width), torch.no_grad():
            result = _measure(in_features, out_features, dtype, round(sparsity, 2), max_tokens)
    with _cache_lock:
        _cache[key] = result
    return result


def clear_crossover_cache() -> None:
    """Forget every measured crossover (they are measured again on the next call)."""
    with _cache_lock:
        _cache.clear()


@contextlib.contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    if threads != saved:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


def _measure(
    in_features: int, out_features: int, dtype: torch.dtype, sparsity: float, max_tokens: int
) -> int:
    generator = torch.Generator().manual_seed(0)
    # The speed of neither path depends on the weights' values.
    weight_t = torch.full((in_features, out_features), 0.01, dtype=dtype)
    # |x| is uniform on [0, 1): the entries with |x| <= sparsity are zeroed.
    x = (torch.rand(max_tokens, in_features, generator=generator) * 2 - 1).to(dtype)
    best = 0
    tokens = 1
    while tokens <= max_tokens:
        if not _sparse_faster(x[:tokens], weight_t, sparsity):
            break
        best = tokens
        tokens *= 2
    return best


def _sparse_faster(x: Tensor, weight_t: Tensor, threshold: float) -> bool:
    """Whether the sparse op beats the dense reference on ``x``.

    One warm-up call of each, then ``REPEATS`` interleaved pairs of timed
    samples; the median of the pairs' ratios decides, so one sample slowed by
    another process does not.
    """

    def sparse() -> object:
        return sparse_linear(x, weight_t, None, threshold)

    def dense() -> object:
        return sparse_linear_reference(x, weight_t, None, threshold)

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
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner
