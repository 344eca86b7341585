"""Per-layer sparsity levels for one model-wide target, chosen greedily.

:func:`layer_sensitivity` measures, for each threshold-mode layer alone, a
user-given error (for instance ``1 - cosine`` of the model's output against the
dense model's on held-out calibration data) at a grid of levels, moving the
thresholds with ``retarget()`` (no new calibration). :func:`allocate_greedy`
then raises, one grid step at a time, the level of the layer whose next step
costs the least error per unit of model-wide sparsity, until the weighted mean
level reaches the target. It treats the layers' errors as additive; the
measured curve decides whether that serves a given model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from actsparse.core import ConfigError
from actsparse.hooks._threshold import SparsityTargetWarning

if TYPE_CHECKING:
    from actsparse.hooks._sparsifier import ActivationSparsifier

__all__ = ["allocate_greedy", "layer_sensitivity"]


def _levels(levels: object) -> list[float]:
    if (
        isinstance(levels, (str, bytes))
        or not isinstance(levels, Sequence)
        or not levels
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in levels
        )
    ):
        raise ConfigError(f"levels must be a non-empty list of numbers in (0, 1], got {levels!r}")
    return sorted({float(v) for v in levels})


def layer_sensitivity(
    sparsifier: ActivationSparsifier,
    error: Callable[[], float],
    levels: Sequence[float],
    layers: Sequence[str] | None = None,
) -> dict[str, dict[float, float]]:
    """``{layer: {level: error()}}`` with that layer alone at each level, the others at 0.

    Level 0 is measured once (every layer at 0) and included in each row.
    The thresholds are put back as they were before the call returns.
    """
    grid = _levels(levels)
    known = sparsifier.thresholds
    names = list(known) if layers is None else list(layers)
    missing = [n for n in names if n not in known]
    if missing or not names:
        raise ConfigError(
            f"layer_sensitivity needs threshold-mode layers after step(); "
            f"{', '.join(map(repr, missing)) or 'none'} are not (known: "
            f"{', '.join(map(repr, known)) or 'none'})"
        )
    before = {n: known[n].target for n in names}
    table: dict[str, dict[float, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityTargetWarning)
        try:
            sparsifier.retarget(dict.fromkeys(names, 0.0))
            base = float(error())
            for name in names:
                row = {0.0: base}
                for level in grid:
                    sparsifier.retarget({name: level})
                    row[level] = float(error())
                sparsifier.retarget({name: 0.0})
                table[name] = row
        finally:
            sparsifier.retarget(before)
    return table


def allocate_greedy(
    table: Mapping[str, Mapping[float, float]],
    target: float,
    weights: Mapping[str, float],
) -> dict[str, float]:
    """Per-layer levels whose ``weights``-weighted mean is ``target``, chosen greedily.

    ``table`` comes from :func:`layer_sensitivity`; ``weights`` give each
    layer's share of the model-wide count (its input width, say, when every
    layer sees the same tokens). The last step is cut short so the weighted
    mean equals ``target`` exactly, unless the grid's top levels fall short of it
    (or only steps of infinite error are left). An error that is NaN is refused.
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 1:
        raise ConfigError(f"target must be a number in [0, 1], got {target!r}")
    if set(weights) != set(table):
        raise ConfigError("weights must name exactly the layers of the table")
    total = float(sum(weights.values()))
    if not all(w > 0 and math.isfinite(w) for w in weights.values()) or total <= 0:
        raise ConfigError("weights must be positive, finite numbers")
    for name, row in table.items():
        for level, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(
                    f"the error of layer {name!r} at level {level!r} is {value!r}, not a number: "
                    "the greedy allocation cannot weigh it (an error() that returns NaN "
                    "measured a NaN or inf; leave those out of it)"
                )
    grids = {name: sorted(row) for name, row in table.items()}
    position = dict.fromkeys(table, 0)
    levels = {name: grids[name][0] for name in table}
    reached = sum(weights[n] * levels[n] for n in table) / total
    while reached < target:
        best, best_cost = None, math.inf
        for name, grid in grids.items():
            i = position[name]
            if i + 1 >= len(grid):
                continue
            gain = weights[name] / total * (grid[i + 1] - grid[i])
            cost = (table[name][grid[i + 1]] - table[name][grid[i]]) / gain
            if cost < best_cost:  # a NaN cost (inf - inf) is never the best
                best, best_cost = name, cost
        if best is None:
            break
        i = position[best]
        step = weights[best] / total * (grids[best][i + 1] - grids[best][i])
        if reached + step > target:  # cut the last step short
            share = (target - reached) / step
            levels[best] = grids[best][i] + share * (grids[best][i + 1] - grids[best][i])
            reached = target
            break
        position[best] = i + 1
        levels[best] = grids[best][i + 1]
        reached += step
    return levels
