"""Up to how many tokens a zero-skipping kernel beats the dense layer, measured.

At one token a linear layer is bound by memory bandwidth and skipping the
weight rows of zeroed inputs pays; with more tokens the dense matrix product
reuses each weight many times and wins. Where the two cross depends on the
shape, the dtype, the sparsity, the thread count, the device and the
machine, so it is measured, once per process and configuration, never per
forward pass. Every kernel uses the one search here: it passes the two
callables to compare (per token count) and the timer of its device.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Iterator

import torch

from actsparse.core import ConfigError

__all__ = [
    "REPEATS",
    "CrossoverCache",
    "Timer",
    "check_crossover_arguments",
    "last_winning_count",
    "num_threads",
    "perf_counter_timer",
    "sparse_faster",
]

#: interleaved repetitions per token count; the median of their ratios decides
REPEATS = 3

#: ``timer(fn, inner) -> seconds``: the time of one call of ``fn``, averaged over ``inner``.
Timer = Callable[[Callable[[], object], int], float]


def perf_counter_timer(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``fn`` on the host's clock (for kernels that return when done)."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def sparse_faster(
    sparse: Callable[[], object],
    dense: Callable[[], object],
    timer: Timer,
    *,
    min_sample_seconds: float,
    repeats: int = REPEATS,
) -> bool:
    """Whether ``sparse`` beats ``dense``.

    One warm-up call of each (it may compile a kernel for the shape), one
    timed call of each to size the samples (each sample repeats the call
    until it lasts about ``min_sample_seconds``), then ``repeats``
    interleaved pairs of samples, alternating which goes first. The median
    of the pairs' ratios decides, so one sample slowed by another process
    does not.
    """
    sparse()
    dense()
    inner = max(1, round(min_sample_seconds / max(timer(sparse, 1), timer(dense, 1), 1e-12)))
    ratios = []
    for rep in range(repeats):
        if rep % 2:
            dense_s = timer(dense, inner)
            ratios.append(dense_s / timer(sparse, inner))
        else:
            sparse_s = timer(sparse, inner)
            ratios.append(timer(dense, inner) / sparse_s)
    return statistics.median(ratios) > 1.0


def last_winning_count(wins: Callable[[int], bool], max_tokens: int) -> int:
    """The last of 1, 2, 4, ... (up to ``max_tokens``) for which ``wins`` holds before it
    first fails; 0 if it fails at 1."""
    best = 0
    tokens = 1
    while tokens <= max_tokens:
        if not wins(tokens):
            break
        best = tokens
        tokens *= 2
    return best


def check_crossover_arguments(
    where: str, in_features: int, out_features: int, sparsity: float, max_tokens: int
) -> None:
    """Refuse a shape, sparsity or token bound that no measurement can use, naming ``where``."""
    if in_features < 1 or out_features < 1:
        raise ConfigError(f"{where}: features must be >= 1, got {in_features}, {out_features}")
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"{where}: sparsity must lie in [0, 1], got {sparsity}")
    if max_tokens < 1:
        raise ConfigError(f"{where}: max_tokens must be >= 1, got {max_tokens}")


class CrossoverCache:
    """Measured crossovers of one kernel, by configuration, for this process."""

    def __init__(self) -> None:
        self._values: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, measure: Callable[[], int]) -> int:
        """The value cached under ``key``, or ``measure()`` (outside the lock), cached."""
        with self._lock:
            if key in self._values:
                return self._values[key]
        value = measure()
        with self._lock:
            self._values[key] = value
        return value

    def clear(self) -> None:
        """Forget every measured crossover (they are measured again on the next call)."""
        with self._lock:
            self._values.clear()


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block; the old setting after it."""
    saved = torch.get_num_threads()
    if threads != saved:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)
