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

import attrs
import torch

from actsparse.core import ConfigError

__all__ = [
    "HISTOGRAM_PARAMS",
    "FeatureSums",
    "abs_histogram_aggregate",
    "check_abs_histogram",
    "finalize_histogram",
    "init_histogram",
    "target_threshold",
]

HISTOGRAM_PARAMS = frozenset({"bins_per_octave", "log2_range", "feature_sums"})
#: Bins per octave of the per-feature sums (``feature_sums=True``): coarser than the
#: counts, so the table holds about 160 numbers per input feature.
_SUM_BINS_PER_OCTAVE = 4
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


def _check_feature_sums(value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"feature_sums must be True or False, got {value!r}")
    return value


def check_abs_histogram(options: Mapping[str, Any]) -> None:
    """The ``abs_histogram`` record's ``check``: ``bins_per_octave``, ``log2_range`` and
    ``feature_sums``."""
    _layout(
        options.get("bins_per_octave", _BINS_PER_OCTAVE), options.get("log2_range", _LOG2_RANGE)
    )
    _check_feature_sums(options.get("feature_sums", False))


def _sum_layout(bins_per_octave: int, nbins: int) -> tuple[int, int]:
    """``(shift, columns)``: a count bin ``k >= 1`` adds to sum column ``1 + (k - 1) >> shift``;
    column 0 holds the values below ``2 ** lo``, the last one nothing (invalid positions)."""
    shift = max(bins_per_octave.bit_length() - _SUM_BINS_PER_OCTAVE.bit_length(), 0)
    return shift, (nbins >> shift) + 2


def init_histogram(
    x: torch.Tensor,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
    feature_sums: bool = False,
) -> torch.Tensor:
    """Zero counts: ``[below 2**lo, *bins, invalid]``.

    With ``feature_sums`` the accumulator is float64 and the counts are followed
    by a ``(columns, x.shape[-1])`` table of signed sums, flattened.
    """
    _, _, nbins = _layout(bins_per_octave, log2_range)
    if not _check_feature_sums(feature_sums):
        return torch.zeros(nbins + 2, dtype=torch.int64, device=x.device)
    _, columns = _sum_layout(bins_per_octave, nbins)
    width = x.shape[-1] if x.ndim else 1
    return torch.zeros(nbins + 2 + columns * width, dtype=torch.float64, device=x.device)


def abs_histogram_aggregate(
    acc: torch.Tensor,
    x: torch.Tensor,
    valid: torch.Tensor | None = None,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
    feature_sums: bool = False,
) -> torch.Tensor:
    """Count ``|x|`` into the histogram; positions where ``valid`` is False go to the last bin.

    ``valid`` is a bool tensor that broadcasts to ``x`` (an attention mask
    ``(B, L)`` reshaped to ``(B, L, 1)`` for an input ``(B, L, D)``). With
    ``feature_sums``, each valid value ``x`` is also added, with its sign, to
    the table at its feature (the last dimension) and its coarse bin (4 per
    octave), so that :func:`target_threshold` can tell the mean of what a
    threshold zeroes, feature by feature.
    """
    shift, lo_code, nbins = _layout(bins_per_octave, log2_range)
    magnitude = x.float()
    signed = magnitude if feature_sums else None
    magnitude = magnitude.abs() if magnitude is x or feature_sums else magnitude.abs_()
    code = magnitude.view(torch.int32) >> shift
    code = code.clamp_(lo_code - 1, lo_code + nbins - 1).sub_(lo_code - 1)
    if valid is not None:
        code = torch.where(valid, code, nbins + 1)
    flat = code.reshape(-1)
    if signed is None:
        return acc.index_add(0, flat, acc.new_ones(()).expand(flat.shape[0]))
    counts = acc[: nbins + 2].index_add(0, flat, acc.new_ones(()).expand(flat.shape[0]))
    sum_shift, columns = _sum_layout(bins_per_octave, nbins)
    width = x.shape[-1] if x.ndim else 1
    if acc.numel() != nbins + 2 + columns * width:
        kept = (acc.numel() - nbins - 2) // columns
        raise ConfigError(
            f"abs_histogram(feature_sums=True) keeps sums for {kept} features, but the input "
            f"has {width} along its last dimension"
        )
    column = (code.sub_(1).clamp_(min=-1) >> sum_shift).add_(1).reshape(-1, width).long()
    if valid is not None:
        signed = torch.where(valid, signed, 0.0)
    table = acc[nbins + 2 :].view(columns, width)
    table = table.scatter_add(0, column, signed.reshape(-1, width).double())
    return torch.cat((counts, table.reshape(-1)))


@attrs.frozen(eq=False)
class FeatureSums:
    """What :func:`finalize_histogram` returns with ``feature_sums=True``.

    Attributes:
        histogram: The ``(2, bins)`` edges and counts, as without sums.
        sums: ``(columns, features)`` float64 signed sums per coarse bin.
        shift: Count bin ``k >= 1`` lies in sum column ``1 + (k - 1) >> shift``.
    """

    histogram: torch.Tensor
    sums: torch.Tensor
    shift: int


def finalize_histogram(
    acc: torch.Tensor,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
    feature_sums: bool = False,
) -> torch.Tensor | FeatureSums:
    """``(2, nbins + 1)`` float64: each bin's upper edge, and its count (invalid ones dropped).

    With ``feature_sums``: a :class:`FeatureSums` holding that and the sum table.
    """
    shift, lo_code, nbins = _layout(bins_per_octave, log2_range)
    codes = torch.arange(lo_code, lo_code + nbins + 1, dtype=torch.int32, device=acc.device)
    edges = (codes << shift).view(torch.float32).to(torch.float64)
    histogram = torch.stack((edges, acc[: nbins + 1].to(torch.float64)))
    if not feature_sums:
        return histogram
    sum_shift, columns = _sum_layout(bins_per_octave, nbins)
    rest = acc.numel() - nbins - 2
    if rest <= 0 or rest % columns:
        raise ConfigError(
            f"abs_histogram(feature_sums=True): an accumulator of {acc.numel()} numbers holds "
            "no sum table"
        )
    sums = acc[nbins + 2 :].to(torch.float64).view(columns, rest // columns)
    return FeatureSums(histogram, sums, sum_shift)


def target_threshold(
    histogram: torch.Tensor | FeatureSums, sparsity_level: float
) -> tuple[float, float, float] | tuple[float, float, float, torch.Tensor]:
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
        ``sparsity_level``. Given a :class:`FeatureSums` (``abs_histogram``
        with ``feature_sums=True``), a fourth element follows: the offset,
        one float64 number per feature, the mean over the counted positions
        of the values that the threshold zeroes (signed; the coarse bin that
        holds the threshold counts in proportion to its counts below it).

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
    sums = histogram if isinstance(histogram, FeatureSums) else None
    if sums is not None:
        histogram = sums.histogram
    if not isinstance(histogram, torch.Tensor) or histogram.ndim != 2 or histogram.shape[0] != 2:
        raise ConfigError(
            "target_threshold needs a (2, bins) histogram from abs_histogram, got "
            + (
                f"shape {tuple(histogram.shape)}"
                if isinstance(histogram, torch.Tensor)
                else type(histogram).__name__
            )
        )
    edges, counts = histogram[0].double().cpu(), histogram[1].double().cpu()
    total = float(counts.sum())
    if total <= 0:
        raise ConfigError("the histogram counted no valid position; nothing to calibrate from")
    cumulative = counts.cumsum(0) / total
    zero_fraction = float(cumulative[0])
    level = float(sparsity_level)
    if level <= zero_fraction:
        if sums is not None:
            return 0.0, zero_fraction, zero_fraction, _offset(sums, counts, total, 0, 1.0)
        return 0.0, zero_fraction, zero_fraction
    index = int(torch.searchsorted(cumulative, torch.tensor([level], dtype=torch.float64)))
    index = min(max(index, 1), edges.shape[0] - 1)
    lower, upper = float(edges[index - 1]), float(edges[index])
    inside = float(counts[index]) / total
    fraction = 1.0 if inside <= 0 else (level - float(cumulative[index - 1])) / inside
    fraction = min(max(fraction, 0.0), 1.0)
    threshold = lower * (upper / lower) ** fraction
    if sums is not None:
        return threshold, level, zero_fraction, _offset(sums, counts, total, index, fraction)
    return threshold, level, zero_fraction


def _offset(
    sums: FeatureSums, counts: torch.Tensor, total: float, index: int, fraction: float
) -> torch.Tensor:
    """The per-feature mean of the values zeroed by a threshold inside count bin ``index``
    (a ``fraction`` of its counts below the threshold)."""
    table = sums.sums.cpu()
    width = table.shape[1]
    positions = total / width  # every counted position adds one value per feature
    if index == 0:
        return table[0] / positions
    column = 1 + ((index - 1) >> sums.shift)
    first = 1 + ((column - 1) << sums.shift)  # the count bins of that sum column
    last = min(column << sums.shift, counts.shape[0] - 1)
    in_column = float(counts[first : last + 1].sum())
    below = float(counts[first:index].sum()) + fraction * float(counts[index])
    share = below / in_column if in_column > 0 else 1.0
    return (table[:column].sum(0) + share * table[column]) / positions


def column_norm(layer: torch.nn.Module) -> torch.Tensor:
    """``||W[:, i]||_2`` for each input feature ``i`` of a layer with a 2-D ``weight``.

    The scale of the ``weighted_threshold`` mask strategy (WINA's score
    ``|x_i| * ||W[:, i]||``): zeroing ``x_i`` changes the layer's output by
    ``x_i * W[:, i]``, whose norm is that score. Computed in float32.

    Args:
        layer: The module that consumes the input; its ``weight`` is read.

    Returns:
        A float32 tensor of ``in_features`` non-negative numbers.

    Raises:
        ConfigError: The layer has no 2-D ``weight`` of shape
            ``(out_features, in_features)``, as ``nn.Linear`` has.
    """
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise ConfigError(
            "column_norm needs a layer with a 2-D weight (out_features, in_features), as "
            f"nn.Linear has; this one's weight is {'missing' if shape is None else shape}"
        )
    norms: torch.Tensor = torch.linalg.vector_norm(weight.detach().float(), dim=0)
    return norms
