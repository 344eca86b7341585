"""Per-layer sparsity levels for one model-wide target, chosen greedily.

:func:`layer_sensitivity` measures, for each threshold-mode layer alone, a
user-given error (for instance ``1 - cosine`` of the model's output against the
dense model's on held-out calibration data) at a grid of levels, moving the
thresholds with ``retarget()`` (no new calibration): a forward pass per layer
and level. :func:`linearized_sensitivity` estimates the same table, to second
order, from a few backward passes whatever the number of layers. :func:`allocate_greedy`
then raises, one grid step at a time, the level of the layer whose next step
costs the least error per unit of model-wide sparsity, until the weighted mean
level reaches the target. It treats the layers' errors as additive; the
measured curve decides whether that serves a given model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from actsparse.core import LAYER_KEY, ConfigError
from actsparse.hooks._sparsifier import input_change
from actsparse.hooks._threshold import SparsityTargetWarning

if TYPE_CHECKING:
    from actsparse.hooks._sparsifier import ActivationSparsifier

__all__ = ["allocate_greedy", "layer_sensitivity", "linearized_sensitivity"]


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


def _names(
    sparsifier: ActivationSparsifier, layers: Sequence[str] | None, caller: str
) -> list[str]:
    known = sparsifier.thresholds
    names = list(known) if layers is None else list(layers)
    missing = [n for n in names if n not in known]
    if missing or not names:
        raise ConfigError(
            f"{caller} needs threshold-mode layers after step(); "
            f"{', '.join(map(repr, missing)) or 'none'} are not (known: "
            f"{', '.join(map(repr, known)) or 'none'})"
        )
    return names


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
    names = _names(sparsifier, layers, "layer_sensitivity")
    known = sparsifier.thresholds
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


#: What :func:`linearized_sensitivity` estimates: the relative squared error of the
#: output, or the mean KL divergence of the distributions that its last dimension's
#: logits give.
DIVERGENCES = ("squared", "kl")


class _Recorded:
    """What one probe's forward pass left at each layer: its inputs (and output), and the
    zero added to that output (or input) whose gradient is ``J^T r`` (or ``W^T J^T r``)."""

    def __init__(self) -> None:
        self.inputs: dict[str, tuple[Any, ...]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.zeros: dict[str, torch.Tensor] = {}

    def hook(self, name: str) -> Callable[..., Any]:
        def record(module: Any, args: tuple[Any, ...], out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            kept = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            self.inputs[name] = tuple(kept)
            self.outputs[name] = out.detach()
            # a zero that requires grad: d f / d out arrives on it, whether or not the
            # model's parameters require grad
            probe = torch.zeros_like(out, requires_grad=True)
            self.zeros[name] = probe
            return out + probe

        return record

    def input_hook(self, name: str) -> Callable[..., Any]:
        """A pre-hook for a layer whose change is a function of its input: it records the
        input and adds the zero to it, so the gradient there is ``W^T J^T r``."""

        def record(module: Any, args: tuple[Any, ...]) -> Any:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            if not x.is_floating_point():
                return None
            self.inputs[name] = (x.detach(),)
            probe = torch.zeros_like(x, requires_grad=True)
            self.zeros[name] = probe
            return (x + probe, *args[1:])

        return record


def _projection(
    measured: torch.Tensor, finite: torch.Tensor, divergence: str, generator: torch.Generator
) -> torch.Tensor:
    """One random ``r`` for ``measured``, zero where it is left out: standard normal for
    ``"squared"``; ``onehot(y) - p`` for ``"kl"``, ``y`` drawn from ``p = softmax``."""
    if divergence == "kl":
        p = torch.where(finite, measured, torch.zeros_like(measured)).softmax(-1)
        rows = p.reshape(-1, p.shape[-1])
        drawn = torch.multinomial(rows.cpu(), 1, generator=generator).to(p.device)
        r = (-rows).scatter_add(1, drawn, torch.ones_like(drawn, dtype=rows.dtype)).reshape(p.shape)
    else:
        r = torch.randn(measured.shape, generator=generator).to(measured.device)
    return torch.where(finite, r, torch.zeros_like(r))


def _squared_dots(grads: Sequence[torch.Tensor], change: torch.Tensor) -> float:
    """``sum_k (g_k . change)^2``. Entries that a NaN or inf reaches are left out, as the
    probe error leaves them out of the output."""
    flat = change.float().reshape(-1)
    dots = torch.stack([g @ flat for g in grads])
    if not bool(dots.isfinite().all()):
        dots = torch.stack([torch.where((g * flat).isfinite(), g * flat, 0.0).sum() for g in grads])
    return float(dots.pow(2).sum())


def linearized_sensitivity(
    sparsifier: ActivationSparsifier,
    output: Callable[[Any], torch.Tensor],
    probes: Sequence[Any],
    levels: Sequence[float],
    layers: Sequence[str] | None = None,
    *,
    projections: int = 4,
    seed: int = 0,
    divergence: str = "squared",
) -> dict[str, dict[float, float]]:
    """``{layer: {level: estimated error}}`` like :func:`layer_sensitivity`, from a few
    backward passes instead of a forward pass per layer and level.

    The error estimated is the one :func:`layer_sensitivity` measures with
    ``sparsify()``'s probe error: ``||f_sparse - f||^2 / ||f||^2`` for the
    tensor ``f = output(batch)`` summed over ``probes``, with that layer alone
    at each level. To second order it is ``||J dy||^2``, where ``dy`` is the
    change of the layer's output (its zeros and offset, on the dense model's
    inputs) and ``J`` the Jacobian of ``f`` with respect to that output. Each
    ``J^T r`` comes from one backward pass for a random ``r`` (``projections``
    of them), and ``E[(r . J dy)^2] = ||J dy||^2``. Each probe batch is one
    term of that sum, so probes of one example each (``sparsify()`` cuts them
    so) also average the estimate over the examples.

    For a plain ``nn.Linear``, ``dy = W dx`` where ``dx`` is the change of its
    input (:meth:`Threshold.input_change
    <actsparse.hooks._threshold.Threshold.input_change>`), so ``r . J dy =
    (W^T J^T r) . dx``: the gradient is taken at the layer's input, and each
    level costs elementwise work on the recorded input, no pass of the layer.
    Any other module runs alone at each level on its recorded inputs, and the
    gradient is taken at its output.

    Cost, for ``P`` probe batches: ``P`` forward passes that keep their graph,
    ``projections * P`` backward passes, and ``len(levels) * P`` passes of each
    layer alone over its recorded inputs for the layers that are not plain
    ``nn.Linear`` modules, whatever the number of layers. The thresholds move
    ``len(levels) + 2`` times (and ``len(levels) + 1`` more per probe batch if
    some layer is not a plain Linear). Memory: each layer's inputs (and outputs) and
    ``projections`` gradients for one probe batch.

    With ``divergence="kl"``, ``f`` holds logits (the last dimension) and the
    error is the mean over positions of ``KL(softmax(f) || softmax(f_sparse))``,
    to second order ``dy^T J^T F J dy / 2`` with the Fisher matrix ``F =
    diag(p) - p p^T``; each ``r`` is then ``onehot(y) - p`` for a token ``y``
    drawn from ``p`` at each position, whose covariance is ``F``.

    ``output(batch)`` runs the model on ``batch`` and returns the tensor to
    measure (the real positions only, say) with its graph: it is called with
    grad enabled. The thresholds are put back as they were before the call
    returns.
    """
    grid = _levels(levels)
    names = _names(sparsifier, layers, "linearized_sensitivity")
    if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
        raise ConfigError(f"projections must be a positive int, got {projections!r}")
    if divergence not in DIVERGENCES:
        raise ConfigError(
            f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}"
        )
    modules = {name: sparsifier.data_groups[name][LAYER_KEY] for name in names}
    before = {n: sparsifier.thresholds[n].target for n in names}
    sums = {name: dict.fromkeys(grid, 0.0) for name in names}
    scale = 0.0
    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityTargetWarning)
        try:
            # a plain Linear changes its output by W @ (its input's change): the gradient
            # at its input gives the estimate with no pass of the layer, and each level's
            # change is taken once, here. Other layers run alone at each level.
            changes: dict[float, dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
            for level in grid:
                sparsifier.retarget(dict.fromkeys(names, level))
                found_changes = {n: input_change(sparsifier, n) for n in names}
                changes[level] = {n: c for n, c in found_changes.items() if c is not None}
            by_input = set(changes[grid[0]])  # the grid is never empty (_levels)
            others = [n for n in names if n not in by_input]
            sparsifier.retarget(dict.fromkeys(names, 0.0))
            for batch in probes:
                recorded = _Recorded()
                handles = [
                    m.register_forward_pre_hook(recorded.input_hook(n))
                    if n in by_input
                    else m.register_forward_hook(recorded.hook(n))
                    for n, m in modules.items()
                ]
                try:
                    with torch.enable_grad():
                        measured = output(batch)
                finally:
                    for handle in handles:
                        handle.remove()
                if not isinstance(measured, torch.Tensor) or not measured.requires_grad:
                    raise ConfigError(
                        "linearized_sensitivity: output(batch) must return a tensor that "
                        "depends on the layers' outputs"
                    )
                measured = measured.float()
                finite = measured.detach().isfinite()
                if divergence == "kl":
                    # a position with any non-finite logit is left out whole
                    finite = finite.all(-1, keepdim=True).expand_as(finite)
                    scale += 2.0 * float(finite[..., 0].sum())  # mean KL = (r . J dy)^2 / 2
                else:
                    scale += float(measured.detach()[finite].pow(2).sum())
                # 0 * NaN is NaN: the entries left out must not reach the graph
                value = torch.where(finite, measured, torch.zeros_like(measured))
                found = [n for n in names if n in recorded.zeros]
                per_projection = []
                for k in range(projections):
                    r = _projection(measured.detach(), finite, divergence, generator)
                    per_projection.append(
                        torch.autograd.grad(
                            (value * r).sum(),
                            [recorded.zeros[n] for n in found],
                            retain_graph=k + 1 < projections,
                            allow_unused=True,
                        )
                    )
                del measured, value
                recorded.zeros.clear()
                # each layer's K gradients, flat
                grads = {
                    name: [g[i].float().reshape(-1) for g in per_projection]
                    for i, name in enumerate(found)
                    if per_projection[0][i] is not None
                }
                del per_projection
                for level in grid:
                    if any(n in grads for n in others):
                        sparsifier.retarget(dict.fromkeys(others, level))
                    with torch.no_grad():
                        for name, g in grads.items():
                            if name in by_input:
                                change = changes[level][name](recorded.inputs[name][0])
                            else:
                                inputs, dense = recorded.inputs[name], recorded.outputs[name]
                                change = modules[name](*inputs) - dense
                            sums[name][level] += _squared_dots(g, change) / projections
                if others:
                    sparsifier.retarget(dict.fromkeys(others, 0.0))
        finally:
            sparsifier.retarget(before)
    if scale <= 0:
        scale = 1.0
    table = {}
    for name in names:
        row = {0.0: 0.0}
        row.update({level: value / scale for level, value in sums[name].items()})
        table[name] = row
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
