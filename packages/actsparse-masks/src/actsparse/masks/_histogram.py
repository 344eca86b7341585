"""A bounded-memory histogram of ``|x|`` and the threshold that hits a target sparsity.

``abs_histogram`` counts the magnitudes a layer sees into fixed log-spaced
bins: ``bins_per_octave`` bins (a power of two) between ``2 ** lo`` and
``2 ** hi`` (``log2_range=(lo, hi)``), plus one bin for ``|x| < 2 ** lo``
(the exact zeros, in practice) and one for the positions that the caller
marked invalid. The bin of a value is read from the bits of its float32
form (exponent and leading mantissa bits), so binning costs an ``abs``, a
shift, a clamp and an ``index_add``; values above ``2 ** hi`` fall in the top
bin. The accumulator is an int64 vector of ``nbins + 2`` counts whatever the
batch size or sequence length; with the defaults (32 bins per octave over
``[2**-24, 2**16)``) it holds 1282 counts and a bin spans 2.2% of its lower edge.

``target_threshold`` (a ``dynamic`` mask strategy) turns the histogram into the
threshold ``t`` such that a fraction ``sparsity_level`` of the counted
magnitudes is ``<= t``, interpolating geometrically inside the bin. When more
than that fraction is (nearly) zero already, no threshold can reach the target:
it returns ``t = 0`` and the zero fraction as the expected sparsity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from actsparse.core import ConfigError

__all__ = [
    "HISTOGRAM_PARAMS",
    "abs_histogram_aggregate",
    "check_abs_histogram",
    "finalize_histogram",
    "init_histogram",
    "target_threshold",
]

HISTOGRAM_PARAMS = frozenset({"bins_per_octave", "log2_range"})
_BINS_PER_OCTAVE = 32
_LOG2_RANGE = (-24, 16)
_MANTISSA_BITS = 23
_EXPONENT_BIAS = 127


def _layout(bins_per_octave: object, log2_range: object) -> tuple[int, int, int]:
    """``(shift, lo_code, nbins)``: how float32 bits map to bins."""
    if (
        isinstance(bins_per_octave, bool)
        or not isinstance(bins_per_octave, int)
        or bins_per_octave < 1
        or bins_per_octave > 2**10
        or bins_per_octave & (bins_per_octave - 1)
    ):
        raise ConfigError(
            f"bins_per_octave must be a power of two between 1 and 1024, got {bins_per_octave!r}"
        )
    if (
        not isinstance(log2_range, Sequence)
        or len(log2_range) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in log2_range)
        or not -126 <= log2_range[0] < log2_range[1] <= 127
    ):
        raise ConfigError(
            f"log2_range must be two ints (lo, hi) with -126 <= lo < hi <= 127, got {log2_range!r}"
        )
    bits = bins_per_octave.bit_length() - 1
    lo, hi = log2_range
    lo_code = (lo + _EXPONENT_BIAS) << bits
    hi_code = (hi + _EXPONENT_BIAS) << bits
    return _MANTISSA_BITS - bits, lo_code, hi_code - lo_code


def check_abs_histogram(options: Mapping[str, Any]) -> None:
    """The ``abs_histogram`` record's ``check``: ``bins_per_octave`` and ``log2_range``."""
    _layout(
        options.get("bins_per_octave", _BINS_PER_OCTAVE), options.get("log2_range", _LOG2_RANGE)
    )


def init_histogram(
    x: torch.Tensor,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
) -> torch.Tensor:
    """Zero counts: ``[below 2**lo, *bins, invalid]``."""
    _, _, nbins = _layout(bins_per_octave, log2_range)
    return torch.zeros(nbins + 2, dtype=torch.int64, device=x.device)


def abs_histogram_aggregate(
    acc: torch.Tensor,
    x: torch.Tensor,
    valid: torch.Tensor | None = None,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
) -> torch.Tensor:
    """Count ``|x|`` into the histogram; positions where ``valid`` is False go to the last bin.

    ``valid`` is a bool tensor that broadcasts to ``x`` (an attention mask
    ``(B, L)`` reshaped to ``(B, L, 1)`` for an input ``(B, L, D)``).
    """
    shift, lo_code, nbins = _layout(bins_per_octave, log2_range)
    magnitude = x.float()
    magnitude = magnitude.abs() if magnitude is x else magnitude.abs_()
    code = magnitude.view(torch.int32) >> shift
    code = code.clamp_(lo_code - 1, lo_code + nbins - 1).sub_(lo_code - 1)
    if valid is not None:
        code = torch.where(valid, code, nbins + 1)
    flat = code.reshape(-1)
    return acc.index_add(0, flat, acc.new_ones(()).expand(flat.shape[0]))


def finalize_histogram(
    acc: torch.Tensor,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
) -> torch.Tensor:
    """``(2, nbins + 1)`` float64: each bin's upper edge, and its count (invalid ones dropped)."""
    shift, lo_code, nbins = _layout(bins_per_octave, log2_range)
    codes = torch.arange(lo_code, lo_code + nbins + 1, dtype=torch.int32, device=acc.device)
    edges = (codes << shift).view(torch.float32).to(torch.float64)
    return torch.stack((edges, acc[: nbins + 1].to(torch.float64)))


def target_threshold(histogram: torch.Tensor, sparsity_level: float) -> tuple[float, float, float]:
    """``(threshold, expected_sparsity, zero_fraction)`` for a finalized histogram.

    The registered ``target_threshold`` mask strategy (a dynamic one: its
    layers zero ``|x| <= threshold`` of every input). ``threshold`` zeroes the
    fraction ``sparsity_level`` of the counted magnitudes, interpolated
    geometrically inside the bin that holds that quantile.

    Args:
        histogram: What :func:`finalize_histogram` returns: a ``(2, bins)``
            tensor of bin upper edges and counts.
        sparsity_level: The target fraction of zeros, a number in [0, 1].

    Returns:
        ``(threshold, expected_sparsity, zero_fraction)``: ``zero_fraction`` is
        the fraction below the lowest bin edge (the zeros). When it exceeds
        ``sparsity_level`` the target is unreachable: the threshold is 0 and
        ``expected_sparsity`` is ``zero_fraction``; otherwise it is
        ``sparsity_level``.

    Raises:
        ConfigError: ``sparsity_level`` is not a number in [0, 1], the
            histogram has another shape, or it counted nothing.
    """
    if (
        isinstance(sparsity_level, bool)
        or not isinstance(sparsity_level, (int, float))
        or not 0.0 <= sparsity_level <= 1.0
    ):
        raise ConfigError(f"sparsity_level must be a number in [0, 1], got {sparsity_level!r}")
    if histogram.ndim != 2 or histogram.shape[0] != 2:
        raise ConfigError(
            f"target_threshold needs a (2, bins) histogram from abs_histogram, got shape "
            f"{tuple(histogram.shape)}"
        )
    edges, counts = histogram[0].double().cpu(), histogram[1].double().cpu()
    total = float(counts.sum())
    if total <= 0:
        raise ConfigError("the histogram counted no valid position; nothing to calibrate from")
    cumulative = counts.cumsum(0) / total
    zero_fraction = float(cumulative[0])
    level = float(sparsity_level)
    if level <= zero_fraction:
        return 0.0, zero_fraction, zero_fraction
    index = int(torch.searchsorted(cumulative, torch.tensor([level], dtype=torch.float64)))
    index = min(max(index, 1), edges.shape[0] - 1)
    lower, upper = float(edges[index - 1]), float(edges[index])
    inside = float(counts[index]) / total
    fraction = 1.0 if inside <= 0 else (level - float(cumulative[index - 1])) / inside
    fraction = min(max(fraction, 0.0), 1.0)
    threshold = lower * (upper / lower) ** fraction
    return threshold, level, zero_fraction
