"""A bounded-memory histogram of ``|x|`` and the threshold that hits a target sparsity.

``abs_histogram`` counts the magnitudes a layer sees into fixed log-spaced
bins: ``bins_per_octave`` bins (a power of two) between ``2 ** lo`` and
``2 ** hi`` (``log2_range=(lo, hi)``; by default every float32 magnitude from
``2 ** -24`` up), plus one bin for ``|x| < 2 ** lo`` (the exact zeros, in
practice), one for the non-finite values (NaN, inf), which are counted there
and nowhere else, and one for the positions that the caller marked invalid.
The bin of a value is read from the bits of its float32 form (exponent and
leading mantissa bits), so binning costs an ``abs``, a shift, a clamp, a
comparison and an ``index_add``; values above ``2 ** hi`` fall in the top bin.
The accumulator is an int64 vector of ``nbins + 3`` counts whatever the batch
size or sequence length; with the defaults (32 bins per octave over
``[2**-24, 2**128)``) it holds 4867 counts and a bin spans 2.2% of its lower
edge.

``target_threshold`` (a ``dynamic`` mask strategy) turns the histogram into the
threshold ``t`` such that a fraction ``sparsity_level`` of the counted
magnitudes is ``<= t``, interpolating geometrically inside the bin. When more
than that fraction is (nearly) zero already, no threshold can reach the target:
it returns ``t = 0`` and the zero fraction as the expected sparsity. When the
bin that holds the target holds more than a point of the counts and a
neighbour holds much less (equal values, ties, or values piled up at one
magnitude), interpolating would promise what no threshold does: ``t`` is then
put at the edge of that bin nearer to the target, and the expected sparsity
is exactly what it zeroes of the calibration values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from actsparse.core import SPARSITY_TOLERANCE, ConfigError

__all__ = [
    "HISTOGRAM_PARAMS",
    "FeatureSums",
    "abs_histogram_aggregate",
    "check_abs_histogram",
    "finalize_histogram",
    "histogram_skipped",
    "init_histogram",
    "target_threshold",
]

HISTOGRAM_PARAMS = frozenset({"bins_per_octave", "log2_range", "feature_sums"})
#: Bins per octave of the per-feature sums (``feature_sums=True``): coarser than the
#: counts, so the table holds about 160 numbers per input feature.
_SUM_BINS_PER_OCTAVE = 4
#: The sums keep that resolution over the first octaves of the range (``[2**-24,
#: 2**16)``, every fp16 magnitude, with the defaults); one column holds the rest.
_SUM_OCTAVES = 40
_BINS_PER_OCTAVE = 32
_LOG2_RANGE = (-24, 128)
_MANTISSA_BITS = 23
_EXPONENT_BIAS = 127
#: The float32 bits of inf: every NaN and inf has these exponent bits, or more.
_INF_BITS = 0x7F800000
#: After the bins: the count of non-finite values, then that of invalid positions.
_EXTRA_COUNTS = 3
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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
        or not -126 <= log2_range[0] < log2_range[1] <= 128
    ):
        raise ConfigError(
            f"log2_range must be two ints (lo, hi) with -126 <= lo < hi <= 128, got {log2_range!r}"
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
    """``(shift, columns)``: a count bin ``k >= 1`` adds to sum column
    ``1 + min((k - 1) >> shift, columns - 2)``: column 0 holds the values below
    ``2 ** lo``; past the first :data:`_SUM_OCTAVES` octaves the last column holds
    the rest."""
    shift = max(bins_per_octave.bit_length() - _SUM_BINS_PER_OCTAVE.bit_length(), 0)
    fine = min(nbins, _SUM_OCTAVES * bins_per_octave) >> shift
    return shift, 1 + fine + (nbins > fine << shift)


def _size_error(acc: torch.Tensor, counts: int, what: str) -> ConfigError:
    return ConfigError(
        f"abs_histogram: the accumulator holds {acc.numel()} numbers, but its options make "
        f"{counts} counts{what}; it was built with other options (or by an "
        "older actsparse, whose layout differs); calibrate again"
    )


def init_histogram(
    x: torch.Tensor,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
    feature_sums: bool = False,
) -> torch.Tensor:
    """Zero counts: ``[below 2**lo, *bins, non-finite, invalid]``.

    With ``feature_sums`` the accumulator is float64 and the counts are followed
    by a ``(columns, x.shape[-1])`` table of signed sums, flattened.
    """
    _, _, nbins = _layout(bins_per_octave, log2_range)
    if not _check_feature_sums(feature_sums):
        return torch.zeros(nbins + _EXTRA_COUNTS, dtype=torch.int64, device=x.device)
    _, columns = _sum_layout(bins_per_octave, nbins)
    width = x.shape[-1] if x.ndim else 1
    size = nbins + _EXTRA_COUNTS + columns * width
    return torch.zeros(size, dtype=torch.float64, device=x.device)


def abs_histogram_aggregate(
    acc: torch.Tensor,
    x: torch.Tensor,
    valid: torch.Tensor | None = None,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
    feature_sums: bool = False,
) -> torch.Tensor:
    """Count ``|x|`` into the histogram; positions where ``valid`` is False go to the last bin,
    non-finite values (NaN, inf) to the one before it.

    ``valid`` is a bool tensor that broadcasts to ``x`` (an attention mask
    ``(B, L)`` reshaped to ``(B, L, 1)`` for an input ``(B, L, D)``). With
    ``feature_sums``, each valid, finite value ``x`` is also added, with its
    sign, to the table at its feature (the last dimension) and its coarse bin
    (4 per octave), so that :func:`target_threshold` can tell the mean of what
    a threshold zeroes, feature by feature.
    """
    shift, lo_code, nbins = _layout(bins_per_octave, log2_range)
    magnitude = x.float()
    signed = magnitude if feature_sums else None
    magnitude = magnitude.abs() if magnitude is x or feature_sums else magnitude.abs_()
    code = magnitude.view(torch.int32) >> shift
    finite = code < _INF_BITS >> shift
    code = code.clamp_(lo_code - 1, lo_code + nbins - 1).sub_(lo_code - 1)
    slot = torch.where(finite, code, nbins + 1)
    if valid is not None:
        slot = torch.where(valid, slot, nbins + 2)
    flat = slot.reshape(-1)
    ones = acc.new_ones(()).expand(flat.shape[0])
    if signed is None:
        if acc.numel() != nbins + _EXTRA_COUNTS:
            raise _size_error(acc, nbins + _EXTRA_COUNTS, "")
        return acc.index_add(0, flat, ones)
    sum_shift, columns = _sum_layout(bins_per_octave, nbins)
    width = x.shape[-1] if x.ndim else 1
    if acc.numel() != nbins + _EXTRA_COUNTS + columns * width:
        rest = acc.numel() - nbins - _EXTRA_COUNTS
        if rest <= 0 or rest % columns:
            raise _size_error(acc, nbins + _EXTRA_COUNTS, f" and {columns} sums per feature")
        raise ConfigError(
            f"abs_histogram(feature_sums=True) keeps sums for {rest // columns} features, but "
            f"the input has {width} along its last dimension"
        )
    counts = acc[: nbins + _EXTRA_COUNTS].index_add(0, flat, ones)
    column = (code.sub_(1).clamp_(min=-1) >> sum_shift).clamp_(max=columns - 2).add_(1)
    column = column.reshape(-1, width).long()
    keep = finite if valid is None else finite & valid
    signed = torch.where(keep, signed, 0.0)
    table = acc[nbins + _EXTRA_COUNTS :].view(columns, width)
    table = table.scatter_add(0, column, signed.reshape(-1, width).double())
    return torch.cat((counts, table.reshape(-1)))


def histogram_skipped(
    acc: torch.Tensor,
    bins_per_octave: int = _BINS_PER_OCTAVE,
    log2_range: Sequence[int] = _LOG2_RANGE,
    feature_sums: bool = False,
) -> int:
    """How many non-finite values (NaN, inf) the histogram left out (the record's
    ``skipped``: ``step()`` warns with the count)."""
    _, _, nbins = _layout(bins_per_octave, log2_range)
    if acc.numel() < nbins + _EXTRA_COUNTS:
        raise _size_error(acc, nbins + _EXTRA_COUNTS, "")
    return int(acc[nbins + 1])


@attrs.frozen(eq=False)
class FeatureSums:
    """What :func:`finalize_histogram` returns with ``feature_sums=True``.

    Attributes:
        histogram: The ``(2, bins)`` edges and counts, as without sums.
        sums: ``(columns, features)`` float64 signed sums per coarse bin.
        shift: Count bin ``k >= 1`` lies in sum column
            ``1 + min((k - 1) >> shift, columns - 2)`` (the last column holds
            every bin past the first 40 octaves).
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
    """``(2, nbins + 1)`` float64: each bin's upper edge, and its count (the non-finite
    values and the invalid positions dropped).

    With ``feature_sums``: a :class:`FeatureSums` holding that and the sum table.
    """
    shift, lo_code, nbins = _layout(bins_per_octave, log2_range)
    codes = torch.arange(lo_code, lo_code + nbins + 1, dtype=torch.int32, device=acc.device)
    edges = (codes << shift).view(torch.float32).to(torch.float64)
    edges[-1] = 2.0 ** log2_range[1]  # 2 ** 128 has no float32 form
    histogram = torch.stack((edges, acc[: nbins + 1].to(torch.float64)))
    if not feature_sums:
        if acc.numel() != nbins + _EXTRA_COUNTS:
            raise _size_error(acc, nbins + _EXTRA_COUNTS, "")
        return histogram
    sum_shift, columns = _sum_layout(bins_per_octave, nbins)
    rest = acc.numel() - nbins - _EXTRA_COUNTS
    if rest <= 0 or rest % columns:
        raise _size_error(acc, nbins + _EXTRA_COUNTS, f" and {columns} sums per feature")
    sums = acc[nbins + _EXTRA_COUNTS :].to(torch.float64).view(columns, rest // columns)
    return FeatureSums(histogram, sums, sum_shift)


def target_threshold(
    histogram: torch.Tensor | FeatureSums, sparsity_level: float
) -> tuple[float, float, float] | tuple[float, float, float, torch.Tensor]:
    """``(threshold, expected_sparsity, zero_fraction)`` for a finalized histogram.

    The registered ``target_threshold`` mask strategy (a dynamic one: its
    layers zero ``|x| <= threshold`` of every input). ``threshold`` zeroes the
    fraction ``sparsity_level`` of the counted magnitudes, interpolated
    geometrically inside the bin that holds that quantile. Interpolating
    assumes that the bin's values spread across it; when the bin holds more
    than a point of the counts and a neighbour holds less than half its
    density (equal values, ties, or values piled up at one magnitude, that no
    threshold splits), the threshold goes to the edge of that bin whose
    fraction of zeros lies nearer to the target (the lower edge when both are
    as near), and ``expected_sparsity`` is what it zeroes of the counted
    values. The threshold never exceeds the largest float32.

    Args:
        histogram: What :func:`finalize_histogram` returns: a ``(2, bins)``
            tensor of bin upper edges and counts.
        sparsity_level: The target fraction of zeros, a number in [0, 1].

    Returns:
        ``(threshold, expected_sparsity, zero_fraction)``: ``zero_fraction`` is
        the fraction below the lowest bin edge (the zeros). When it exceeds
        ``sparsity_level`` the target is unreachable: the threshold is 0 and
        ``expected_sparsity`` is ``zero_fraction``; when ties put the
        threshold at a bin edge, it is the fraction at or below that edge;
        otherwise it is ``sparsity_level``. Given a :class:`FeatureSums` (``abs_histogram``
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
            # a threshold of 0 zeroes only zeros (the first bin's tiny values stay): no offset
            width, dtype = sums.sums.shape[1], sums.sums.dtype
            return 0.0, zero_fraction, zero_fraction, torch.zeros(width, dtype=dtype)
        return 0.0, zero_fraction, zero_fraction
    index = int(torch.searchsorted(cumulative, torch.tensor([level], dtype=torch.float64)))
    index = min(max(index, 1), edges.shape[0] - 1)
    lower, upper = float(edges[index - 1]), float(edges[index])
    inside = float(counts[index]) / total
    below = float(cumulative[index - 1])
    expected = level
    if inside <= SPARSITY_TOLERANCE or _spread(edges, counts, index):
        fraction = 1.0 if inside <= 0 else (level - below) / inside
        fraction = min(max(fraction, 0.0), 1.0)
        threshold = min(lower * (upper / lower) ** fraction, _FLOAT32_MAX)
    else:
        # ties: no threshold splits this bin, so it goes to an edge of it
        above = below + inside
        if above - level < level - below:
            fraction, expected, threshold = 1.0, above, _cut(edges, counts, index + 1)
        else:
            fraction, expected, threshold = 0.0, below, _cut(edges, counts, index)
    if sums is not None:
        return threshold, expected, zero_fraction, _offset(sums, counts, total, index, fraction)
    return threshold, expected, zero_fraction


def _spread(edges: torch.Tensor, counts: torch.Tensor, index: int) -> bool:
    """Whether both neighbours of bin ``index`` hold at least half its density (count
    per unit of magnitude), as a smooth distribution's do; the bin below 2**lo is no
    neighbour."""

    def density(k: int) -> float:
        if k < 1 or k >= counts.shape[0]:
            return 0.0
        return float(counts[k]) / float(edges[k] - edges[k - 1])

    half = density(index) / 2
    return min(density(index - 1), density(index + 1)) >= half


def _cut(edges: torch.Tensor, counts: torch.Tensor, k: int) -> float:
    """A threshold ``t`` with which ``|x| <= t`` zeroes exactly the counted values of the
    bins below bin ``k`` (``1 <= k <= nbins + 1``).

    A bin edge is exact in every float dtype (it holds 5 mantissa bits), so it is
    the answer where no value can sit on it: the lower edge of bin ``k`` when that bin
    is empty, or the upper edge of the highest non-empty bin below ``k`` when empty
    bins lie between. Otherwise it is the largest float32 below the lower edge of bin
    ``k``, exact for float32 inputs; in fp16 or bf16 it rounds up to that edge, so an
    input on it is zeroed too. Below ``2**lo`` there are only zeros: ``t = 0``.
    """
    if k == 1:
        return 0.0
    if k < counts.shape[0] and float(counts[k]) == 0:
        return min(float(edges[k - 1]), _FLOAT32_MAX)
    filled = torch.nonzero(counts[1:k]).flatten()
    highest = int(filled[-1]) + 1 if filled.numel() else 0
    if highest == 0:
        return 0.0
    if highest < k - 1:
        return float(edges[highest])
    bound = torch.tensor(float(edges[k - 1]), dtype=torch.float32)  # 2**128: inf, below it the max
    return float(torch.nextafter(bound, torch.zeros((), dtype=torch.float32)))


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
    top = table.shape[0] - 1  # the last column also holds every bin past the first octaves
    column = min(1 + ((index - 1) >> sums.shift), top)
    first = 1 + ((column - 1) << sums.shift)  # the count bins of that sum column
    last = counts.shape[0] - 1 if column == top else column << sums.shift
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
