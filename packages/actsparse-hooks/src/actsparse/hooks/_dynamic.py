"""Threshold mode: layers whose mask strategy is ``dynamic``.

Such a layer aggregates a statistic of ``|x|`` while calibrating (the
built-in pair is the ``abs_histogram`` aggregate and the ``target_threshold``
mask), ``step()`` turns it into one threshold per layer, and after
``squash_mask()`` its pre-hook zeroes, per input, the entries with
``|x| <= threshold`` with one ``hardshrink`` call (the threshold is a Python
float, rounded to the input's dtype by the kernel); it builds no other tensor.

Valid positions: inside ``with sparsifier.valid_positions(mask):`` the
aggregate of every threshold-mode layer receives ``valid=mask`` reshaped to
broadcast against the layer's input (an attention mask ``(B, L)`` against an
input ``(B, L, D)``), so padding does not enter the statistics.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from actsparse.core import ConfigError, LayerNotFoundError, MaskError, StateError
from actsparse.hooks._layer import no_graph

if TYPE_CHECKING:
    from actsparse.hooks._layer import Layer

__all__ = ["SparsityTargetWarning", "ThresholdResult", "ValidPositions"]


class SparsityTargetWarning(UserWarning):
    """A layer's target sparsity cannot be reached by a magnitude threshold."""


def _fraction(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 <= float(value) <= 1.0
    ):
        raise ConfigError(f"ThresholdResult.{attribute.name} must be in [0, 1], got {value!r}")


def _threshold(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"ThresholdResult.threshold must be a finite number >= 0, got {value!r}")


@attrs.frozen
class ThresholdResult:
    """What ``step()`` computed for a threshold-mode layer.

    Attributes:
        threshold: Entries with ``|x| <= threshold`` are zeroed.
        target: The ``sparsity_level`` asked for.
        expected_sparsity: The fraction of the calibration positions that the
            threshold zeroes (equal to ``target`` unless it is unreachable).
        zero_fraction: The fraction of calibration positions that were zero
            (below the histogram's lowest edge) already.
    """

    threshold: float = attrs.field(converter=float, validator=_threshold)
    target: float = attrs.field(converter=float, validator=_fraction)
    expected_sparsity: float = attrs.field(converter=float, validator=_fraction)
    zero_fraction: float = attrs.field(converter=float, validator=_fraction)

    @property
    def reachable(self) -> bool:
        """False when the zeros alone exceed the target: the layer overshoots it."""
        return self.expected_sparsity <= self.target + 1e-9

    def to_dict(self) -> dict[str, float]:
        return attrs.asdict(self)


@attrs.define
class ValidPositions:
    """The valid-position mask that threshold-mode aggregates receive, if any."""

    mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def active(self, mask: torch.Tensor) -> Iterator[None]:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ConfigError(
                "valid_positions() needs a bool tensor (True = count this position), got "
                + (f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else repr(mask))
            )
        if self.mask is not None:
            raise ConfigError("valid_positions() is already active; blocks do not nest")
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None


def _valid_for(layer: Layer, valid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``valid`` shaped to broadcast against ``x``: its dims are ``x``'s leading dims."""
    if valid.ndim > x.ndim or tuple(valid.shape) != tuple(x.shape[: valid.ndim]):
        raise ConfigError(
            f"layer {layer.name!r}: the valid-position mask of shape {tuple(valid.shape)} "
            f"does not match the leading dimensions of its input of shape {tuple(x.shape)}"
        )
    if valid.device != x.device:
        raise ConfigError(
            f"layer {layer.name!r}: the valid-position mask is on {valid.device}, the input "
            f"on {x.device}"
        )
    return valid.reshape(*valid.shape, *((1,) * (x.ndim - valid.ndim)))


def aggregate_hook(layer: Layer) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    fn = layer._bound.fn
    init = layer._bound.init or torch.zeros_like
    holder = layer.valid

    def threshold_aggregate_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = no_graph(args[0])
        acc = layer.data
        valid = holder.mask if holder is not None else None
        options = {} if valid is None else {"valid": _valid_for(layer, valid, x)}
        try:
            new = fn(init(x) if acc is None else acc, x, **options)
        except ConfigError:
            raise
        except Exception as exc:
            raise layer._strategy_failed(exc) from exc
        if acc is None:
            layer.input_shape = tuple(x.shape)
        layer.data = new

    return threshold_aggregate_hook


def sparsify_hook(layer: Layer) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    if layer.threshold is None:  # squash_mask() and load_state_dict() refuse this
        raise MaskError(f"layer {layer.name!r} has no threshold: run step() first")

    def threshold_sparsify_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # hardshrink keeps x where |x| > t and writes 0 elsewhere: one kernel, and
        # the threshold is a Python float, so nothing else is built per call.
        result = cast(ThresholdResult, layer.threshold)
        return (F.hardshrink(args[0], result.threshold), *args[1:])

    return threshold_sparsify_hook


@attrs.frozen
class Computed:
    """What step() computes for a threshold-mode layer: the result and the reduced statistic."""

    result: ThresholdResult
    reduced: Any


def compute_threshold(layer: Layer, data: Any) -> Computed:
    """The threshold that step() stores for a threshold-mode layer; changes nothing.

    ``data`` is the layer's accumulator, or the one combined across processes.
    """
    reduced = layer.reduce_data(data, f"layer {layer.name!r}", "threshold")
    return Computed(threshold_for(layer, reduced, layer._mask_options), reduced)


def threshold_for(layer: Layer, reduced: Any, options: Mapping[str, Any]) -> ThresholdResult:
    """Call the layer's dynamic mask strategy on ``reduced`` and check what it returns."""
    where = f"layer {layer.name!r}"
    try:
        out = layer.mask_strategy.fn(reduced, **options)
    except Exception as exc:
        raise MaskError(
            f"{where}: computing the threshold with mask {layer.mask_strategy.name!r} "
            f"failed: {exc!r}"
        ) from exc
    if not isinstance(out, tuple) or len(out) != 3:
        raise MaskError(
            f"{where}: dynamic mask strategy {layer.mask_strategy.name!r} returned "
            f"{type(out).__name__}, not (threshold, expected_sparsity, zero_fraction)"
        )
    target: Any = options.get("sparsity_level", out[1])
    try:
        return ThresholdResult(out[0], target, out[1], out[2])
    except (ConfigError, TypeError, ValueError) as exc:
        raise MaskError(
            f"{where}: dynamic mask strategy {layer.mask_strategy.name!r} returned {out!r}: {exc}"
        ) from exc


def retarget(layers: Mapping[str, Layer], levels: Mapping[str, Any]) -> None:
    """Recompute the thresholds of ``levels``' layers for new sparsity levels, from the
    statistics of their last step(); nothing changes if one fails."""
    new: dict[str, ThresholdResult] = {}
    for name, level in levels.items():
        layer = layers.get(name)
        if layer is None:
            raise LayerNotFoundError(
                f"no layer named {name!r} is registered (registered: "
                f"{', '.join(map(repr, layers)) or 'none'})"
            )
        if not layer.dynamic:
            raise StateError(f"layer {name!r} is not in threshold mode; it cannot be retargeted")
        if layer._reduced is None:
            raise StateError(
                f"layer {name!r} holds no calibration statistics: retarget() works after "
                "step() in this process (state dicts do not keep the histogram)"
            )
        options = {**layer._mask_options, "sparsity_level": level}
        new[name] = threshold_for(layer, layer._reduced, options)
    for name, result in new.items():
        layer = layers[name]
        layer.threshold = result
        layer._mask_options = {**layer._mask_options, "sparsity_level": levels[name]}
        layer.config["sparse_config"]["sparsity_level"] = levels[name]
    warn_unreachable(new)


def warn_unreachable(results: Mapping[str, ThresholdResult]) -> None:
    bad = {name: r for name, r in results.items() if not r.reachable}
    if not bad:
        return
    shown = ", ".join(
        f"{name!r} (target {r.target:.3f}, zeros alone {r.zero_fraction:.3f})"
        for name, r in bad.items()
    )
    warnings.warn(
        f"no threshold reaches the target sparsity of layer(s) {shown}: their inputs hold "
        "more zeros than the target, so they will be sparser than asked; see "
        "sparsifier.thresholds for each layer's expected sparsity",
        SparsityTargetWarning,
        stacklevel=3,
    )
