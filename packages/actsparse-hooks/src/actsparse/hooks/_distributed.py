"""Combining the layers' accumulators across processes before ``step()`` reduces them.

Under ``torch.distributed`` every rank aggregates only its shard of the
calibration data. ``step()`` merges the accumulators with the collective that
each aggregate strategy declares in ``AggregateStrategy.combine``, so every
rank computes the masks that one process would compute from all the data.

Everything here works on copies: the layers' own accumulators are never
written, so a step that fails (on any rank) leaves every rank as it was.
Before any reduction, the ranks exchange a short description of their layers
(one ``all_gather_object``): a problem found on one rank (a layer without
data, an aggregate that cannot be combined, accumulators of other shapes) is
then raised on every rank, instead of leaving the others waiting in a
collective.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from actsparse.core import ActsparseError, ConfigError, StateError, StrategyError

if TYPE_CHECKING:
    from actsparse.hooks._layer import Layer

__all__ = ["combine_accumulators", "resolve_group", "uncombinable"]

# The errors a rank may report to the others before the collectives run.
_REPORTED: dict[str, type[ActsparseError]] = {"ConfigError": ConfigError, "StateError": StateError}


def _reduce_op(name: str) -> Any:
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[name]


def resolve_group(process_group: Any) -> Any:
    """The group to combine over for ``step(process_group=...)``, or None for none.

    ``None`` is the default group when ``torch.distributed`` is initialised;
    ``False`` turns combining off; a ``ProcessGroup`` is used as it is. A group
    of one process needs no combining.
    """
    if process_group is False:
        return None
    available = dist.is_available()
    if process_group is None:
        if not available or not dist.is_initialized():
            return None
        group = dist.group.WORLD
    elif available and isinstance(process_group, dist.ProcessGroup):
        if not dist.is_initialized():
            raise ConfigError(
                "process_group is a ProcessGroup but torch.distributed is not initialised"
            )
        group = process_group
        if dist.get_rank(group) < 0:
            raise ConfigError(
                "process_group: this process is not a member of the given group; every "
                "rank that calls step() with a group must belong to it"
            )
    else:
        raise ConfigError(
            "process_group must be None (the default group when torch.distributed is "
            "initialised), a torch.distributed ProcessGroup, or False (no combining: each "
            f"process computes masks from its own inputs), got {process_group!r}"
        )
    return group if dist.get_world_size(group) > 1 else None


def uncombinable(layer: Layer) -> ConfigError | None:
    """The error for a layer whose accumulator cannot be combined, or None."""
    spec = layer.combine
    name = layer.aggregate.name
    if spec is None:
        return ConfigError(
            f"layer {layer.name!r}: aggregate strategy {name!r} does not say how its "
            "accumulator combines across processes, so step() cannot compute the mask that "
            "one process would compute from every rank's inputs; register the aggregate as "
            "an AggregateStrategy with combine='sum' (or 'max', 'min', one per row, or a "
            "callable; see docs/plugins.md), or call step(process_group=False) to compute "
            "each rank's masks from its own inputs"
        )
    if callable(spec):
        return None
    for part in _parts(layer.data):
        if not isinstance(part, torch.Tensor):
            return ConfigError(
                f"layer {layer.name!r}: aggregate strategy {name!r} declares combine="
                f"{spec!r}, which all-reduces tensors, but its accumulator is a "
                f"{type(part).__name__}; give it a callable combine"
            )
        if isinstance(spec, tuple) and (part.ndim == 0 or part.shape[0] != len(spec)):
            return ConfigError(
                f"layer {layer.name!r}: aggregate strategy {name!r} declares combine="
                f"{list(spec)!r}, one reduction per row along dim 0, but its accumulator "
                f"has shape {tuple(part.shape)}"
            )
    return None


def _parts(data: Any) -> list[Any]:
    return list(data) if isinstance(data, list) else [data]


def _describe(data: Any) -> tuple[Any, ...]:
    """What must agree across ranks for the accumulators to combine."""
    out: list[Any] = []
    for part in _parts(data):
        if isinstance(part, torch.Tensor):
            out.append((tuple(part.shape), str(part.dtype)))
        else:
            out.append(type(part).__name__)
    return tuple(out)


def _layout(layers: Mapping[str, Layer]) -> list[tuple[str, str, tuple[Any, ...]]]:
    return [
        (name, layers[name].aggregate.name, _describe(layers[name].data)) for name in sorted(layers)
    ]


def _show(structure: tuple[Any, ...]) -> str:
    shown = [
        f"shape {s[0]} {s[1]}" if isinstance(s, tuple) else s  # (shape, dtype) or a type name
        for s in structure
    ]
    return shown[0] if len(shown) == 1 else "[" + ", ".join(shown) + "]"


def _layout_mismatch(layouts: list[Any], layers: Mapping[str, Layer]) -> str | None:
    """Describe the first difference between rank 0's layout and another rank's."""
    first = layouts[0]
    for rank, layout in enumerate(layouts[1:], start=1):
        if layout == first:
            continue
        names0 = [entry[0] for entry in first]
        names = [entry[0] for entry in layout]
        if names0 != names:
            return (
                f"rank 0 registers the layers {names0} but rank {rank} registers {names}; "
                "register the same layers on every rank"
            )
        for (name, agg0, data0), (_, agg, data) in zip(first, layout, strict=True):
            if agg0 != agg:
                return (
                    f"layer {name!r} aggregates with {agg0!r} on rank 0 but with {agg!r} on "
                    f"rank {rank}; configure the layers alike on every rank"
                )
            if data0 != data:
                hint = ""
                layer = layers.get(name)
                if layer is not None and layer.aggregate.elementwise:
                    hint = (
                        f"; aggregate {agg0!r} keeps the input's shape, so every rank must "
                        "feed batches of the same shape (a streaming aggregate such as "
                        "'mean' or 'abs_max' folds the sample dimensions and takes any "
                        "batch size)"
                    )
                return (
                    f"layer {name!r}: the accumulator is {_show(data0)} on rank 0 but "
                    f"{_show(data)} on rank {rank}{hint}"
                )
    return None


def _exchange(layers: Mapping[str, Layer], group: Any, problem: ActsparseError | None) -> None:
    """Share every rank's problem and layout; raise the same error on every rank."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    report = None if problem is None else (type(problem).__name__, str(problem))
    mine = (report, None if problem is not None else _layout(layers))
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, mine, group=group)
    where = f"step() across {size} processes"
    unchanged = "; no rank changed its masks or aggregated data"
    if problem is not None:
        raise type(problem)(f"{where}: on this rank ({rank}): {problem}{unchanged}")
    for other, (theirs, _) in enumerate(gathered):
        if theirs is not None:
            kind, message = theirs
            raise _REPORTED.get(kind, StateError)(f"{where}: on rank {other}: {message}{unchanged}")
    mismatch = _layout_mismatch([layout for _, layout in gathered], layers)
    if mismatch is not None:
        raise StateError(f"{where}: {mismatch}{unchanged}")


def combine_accumulators(
    layers: Mapping[str, Layer], group: Any, problem: ActsparseError | None
) -> dict[str, Any]:
    """Every layer's accumulator combined over ``group``, as new tensors.

    ``problem`` is the error this rank would raise on its own (a layer without
    data, ...): every rank raises it, or the first other rank's, before any
    accumulator is reduced. Layers are combined in the order of their names,
    so ranks that registered them in another order still agree.
    """
    _exchange(layers, group, problem)
    names = sorted(layers)
    # Named reductions: the pieces of every accumulator, reduced in one
    # all-reduce per (op, dtype, device) bucket.
    pieces: list[tuple[str, torch.Tensor]] = []
    plans: list[tuple[str, int, torch.Tensor, Any, int]] = []  # layer, part, tensor, spec, first
    callables: list[tuple[str, int, torch.Tensor, Callable[..., Any]]] = []
    for name in names:
        spec = layers[name].combine
        for index, part in enumerate(_parts(layers[name].data)):
            if callable(spec):
                callables.append((name, index, part, spec))
                continue
            plans.append((name, index, part, spec, len(pieces)))
            if isinstance(spec, tuple):
                pieces.extend((op, part[row].reshape(-1)) for row, op in enumerate(spec))
            else:
                pieces.append((spec, part.reshape(-1)))
    reduced: list[torch.Tensor | None] = [None] * len(pieces)
    buckets: dict[tuple[str, torch.dtype, torch.device], list[int]] = {}
    for position, (op, piece) in enumerate(pieces):
        buckets.setdefault((op, piece.dtype, piece.device), []).append(position)
    order = sorted(buckets, key=lambda k: (k[0], str(k[1]), k[2].type, k[2].index or 0))
    for key in order:
        positions = buckets[key]
        flat = torch.cat([pieces[p][1] for p in positions])  # a copy: the originals stay
        dist.all_reduce(flat, op=_reduce_op(key[0]), group=group)
        chunks = torch.split(flat, [pieces[p][1].numel() for p in positions])
        for p, chunk in zip(positions, chunks, strict=True):
            reduced[p] = chunk
    combined: dict[str, dict[int, Any]] = {name: {} for name in names}
    for name, index, part, spec, first in plans:
        if isinstance(spec, tuple):
            rows = [reduced[first + row].view(part.shape[1:]) for row in range(len(spec))]  # type: ignore[union-attr]
            combined[name][index] = torch.stack(rows)
        else:
            combined[name][index] = reduced[first].view(part.shape)  # type: ignore[union-attr]
    for name, index, part, fn in callables:
        mine = part.clone() if isinstance(part, torch.Tensor) else copy.deepcopy(part)
        try:
            combined[name][index] = fn(mine, group)
        except Exception as exc:
            raise StrategyError(
                f"layer {name!r}: combine of aggregate strategy "
                f"{layers[name].aggregate.name!r} raised: {exc!r}; no mask or aggregated "
                "data changed"
            ) from exc
    out: dict[str, Any] = {}
    for name in names:
        parts = [combined[name][i] for i in range(len(combined[name]))]
        out[name] = parts if isinstance(layers[name].data, list) else parts[0]
    return out
