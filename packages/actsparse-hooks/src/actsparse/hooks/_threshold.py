"""Threshold mode: layers whose mask strategy is ``dynamic``.

Such a layer aggregates a statistic of ``|x|`` while calibrating (the
built-in pair is the ``abs_histogram`` aggregate and the ``target_threshold``
mask), ``step()`` turns it into one threshold per layer, and after
``squash_mask()`` the entries of each input with ``|x| <= threshold`` are
zeroed before the layer runs: by default with one ``hardshrink`` call in a
pre-hook (the threshold is a Python float, rounded to the input's dtype by
the kernel), so nothing else is built per call.

Valid positions: inside ``with sparsifier.valid_positions(mask):`` the
aggregate of every threshold-mode layer receives ``valid=mask`` reshaped to
broadcast against the layer's input (an attention mask ``(B, L)`` against an
input ``(B, L, D)``), so padding does not enter the statistics. Only an
aggregate that declares ``takes_valid`` receives it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from actsparse.core import (
    SPARSIFY,
    ConfigError,
    KernelStrategy,
    LayerNotFoundError,
    LayerState,
    Mask,
    MaskError,
    SerializationError,
    StateError,
    ThresholdResult,
)
from actsparse.hooks._layer import Layer, no_graph
from actsparse.hooks._modes import Handle, PreHook

__all__ = [
    "KernelPlan",
    "KernelThreshold",
    "SparsityTargetWarning",
    "Threshold",
    "ValidPositions",
    "retarget",
    "warn_unreachable",
]


class SparsityTargetWarning(UserWarning):
    """A layer's target sparsity cannot be reached by a magnitude threshold."""


@attrs.define
class ValidPositions:
    """The valid-position mask that threshold-mode aggregates receive, if any."""

    mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def active(self, mask: torch.Tensor, layers: Iterable[Layer] = ()) -> Iterator[None]:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ConfigError(
                "valid_positions() needs a bool tensor (True = count this position), got "
                + (f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else repr(mask))
            )
        if self.mask is not None:
            raise ConfigError("valid_positions() is already active; blocks do not nest")
        deaf = [la for la in layers if la.dynamic and not la.aggregate.takes_valid]
        if deaf:
            shown = ", ".join(f"{la.name!r} ({la.aggregate.name!r})" for la in deaf)
            raise ConfigError(
                f"valid_positions(): the aggregate strategies of threshold-mode layer(s) "
                f"{shown} do not take valid positions (AggregateStrategy.takes_valid), so "
                "padding would enter their statistics; use an aggregate that does, such as "
                "'abs_histogram'"
            )
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


@attrs.frozen
class Computed:
    """What step() computes for a threshold-mode layer: the result and the reduced statistic."""

    result: ThresholdResult
    reduced: Any


class Threshold:
    """One threshold per layer, computed by ``step()``; ``|x| <= threshold`` is zeroed."""

    kind = "threshold"

    def __init__(self, valid: ValidPositions) -> None:
        self._valid = valid
        self._result: ThresholdResult | None = None
        # the reduced statistic of the last step(), for retargeting
        self._reduced: Any = None

    @property
    def mask(self) -> Mask | None:
        return None

    @property
    def threshold(self) -> ThresholdResult | None:
        return self._result

    @property
    def ready(self) -> bool:
        return self._result is not None

    @property
    def retargetable(self) -> bool:
        """Whether the statistics of a step() in this process are at hand."""
        return self._reduced is not None

    # ------------------------------------------------------------ aggregation

    def aggregate_hook(self, layer: Layer) -> PreHook:
        fn = layer.bound.fn
        init = layer.bound.init or torch.zeros_like
        holder = self._valid if layer.aggregate.takes_valid else None

        def threshold_aggregate_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = no_graph(
                args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
            )
            acc = layer.data
            valid = holder.mask if holder is not None else None
            options = {} if valid is None else {"valid": _valid_for(layer, valid, x)}
            try:
                new = fn(init(x) if acc is None else acc, x, **options)
            except Exception as exc:
                raise layer.strategy_failed(exc) from exc
            if acc is None:
                layer.input_shape = tuple(x.shape)
            layer.data = new

        return threshold_aggregate_hook

    # ----------------------------------------------------------- application

    def sparsify(self, layer: Layer) -> Handle:
        result = self._result
        if result is None:  # squash_mask() and load_state_dict() refuse this
            raise MaskError(f"layer {layer.name!r} has no threshold: run step() first")
        threshold = result.threshold

        def threshold_sparsify_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            # hardshrink keeps x where |x| > t and writes 0 elsewhere: one kernel, and
            # the threshold is a Python float, so nothing else is built per call.
            x = args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
            return (F.hardshrink(x, threshold), *args[1:])

        return layer.module.register_forward_pre_hook(threshold_sparsify_hook)

    # ------------------------------------------------------------------ step

    def compute(self, layer: Layer, data: Any) -> Computed:
        reduced = layer.reduce_data(data, f"layer {layer.name!r}", "threshold")
        return Computed(self.result_for(layer, reduced, layer.mask_options), reduced)

    def store(self, computed: Computed) -> None:
        self._result = computed.result
        self._reduced = computed.reduced

    def result_for(self, layer: Layer, reduced: Any, options: Mapping[str, Any]) -> ThresholdResult:
        """Call the layer's dynamic mask strategy on ``reduced`` and check what it returns."""
        where = f"layer {layer.name!r}"
        out = layer.call_mask_strategy(reduced, options, where, "threshold")
        name = layer.mask_strategy.name
        if not isinstance(out, tuple) or len(out) != 3:
            raise MaskError(
                f"{where}: dynamic mask strategy {name!r} returned "
                f"{type(out).__name__}, not (threshold, expected_sparsity, zero_fraction)"
            )
        key = layer.mask_strategy.target_key
        target: Any = options.get(key, out[1]) if key is not None else out[1]
        try:
            return ThresholdResult(out[0], target, out[1], out[2])
        except (ConfigError, TypeError, ValueError) as exc:
            raise MaskError(
                f"{where}: dynamic mask strategy {name!r} returned {out!r}: {exc}"
            ) from exc

    def retargeted(self, layer: Layer, level: Any) -> ThresholdResult:
        """The threshold for a new target, from the statistics of the last step();
        nothing changes."""
        key = layer.mask_strategy.target_key
        if key is None:
            raise StateError(
                f"layer {layer.name!r}: mask strategy {layer.mask_strategy.name!r} declares no "
                "target_key, so it cannot be retargeted"
            )
        if self._reduced is None:
            raise StateError(
                f"layer {layer.name!r} holds no calibration statistics: retarget() works after "
                "step() in this process (state dicts do not keep the histogram)"
            )
        if (
            isinstance(level, bool)
            or not isinstance(level, (int, float))
            or not 0.0 <= float(level) <= 1.0
        ):
            raise ConfigError(
                f"layer {layer.name!r}: {key} must be a number in [0, 1], got {level!r}"
            )
        return self.result_for(layer, self._reduced, {**layer.mask_options, key: level})

    def set_result(self, result: ThresholdResult) -> None:
        """Replace the threshold (``retarget``); the hook attached reads it when re-attached."""
        self._result = result

    # ------------------------------------------------------------ state dicts

    def restore(self, layer: Layer, state: LayerState) -> None:
        if state.mask is not None:
            raise SerializationError(
                f"layer {layer.name!r} is in threshold mode; its state must hold no mask"
            )
        if state.hook_state == SPARSIFY and state.threshold is None:
            raise SerializationError(
                f"layer {layer.name!r} is squashed in threshold mode but its state holds no "
                "threshold"
            )
        self._result = state.threshold
        self._reduced = None


@attrs.frozen
class KernelPlan:
    """Which kernel computes a squashed threshold-mode layer, and up to how many tokens.

    ``limit`` None: always the kernel (a kernel forced by name); an int: the
    kernel for inputs of at most that many tokens, the dense path above
    (``kernel="auto"``, from the crossover the kernel measured).
    """

    kernel: KernelStrategy
    limit: int | None = None


class _ForwardHandle:
    """Restores a module's own ``forward`` when the kernel is detached."""

    def __init__(self, module: nn.Module, forward: Any) -> None:
        self._module = module
        self._forward = forward

    def remove(self) -> None:
        module = self._module
        if module.__dict__.get("forward") is self._forward:
            del module.__dict__["forward"]


class KernelThreshold(Threshold):
    """The threshold applied by a registered kernel that computes the layer itself.

    Once squashed, the layer's ``forward`` is replaced by the kernel's
    function (``KernelStrategy.apply``), which zeroes ``|x| <= threshold`` and
    skips the work of the zeros; with a ``limit``, inputs of more tokens take
    the dense path (zero, then the layer's own forward) instead. Calibration,
    ``step()``, thresholds and state are those of :class:`Threshold`.
    """

    def __init__(self, valid: ValidPositions, plan: KernelPlan) -> None:
        super().__init__(valid)
        self.plan = plan

    @classmethod
    def of(cls, mode: Threshold, plan: KernelPlan) -> KernelThreshold:
        """``mode``'s threshold and statistics, applied by ``plan``'s kernel."""
        new = cls(mode._valid, plan)
        new._result, new._reduced = mode._result, mode._reduced
        return new

    def dense(self) -> Threshold:
        """The same threshold and statistics, applied by the dense pre-hook."""
        new = Threshold(self._valid)
        new._result, new._reduced = self._result, self._reduced
        return new

    def sparsify(self, layer: Layer) -> Handle:
        result = self._result
        if result is None:
            raise MaskError(f"layer {layer.name!r} has no threshold: run step() first")
        module = layer.module
        threshold = result.threshold
        apply = self.plan.kernel.apply
        if apply is None:  # the runtime's own dense path
            return super().sparsify(layer)
        own = type(module).forward.__get__(module)
        fast = apply(module, threshold)
        limit = self.plan.limit

        if limit is None:

            def forward(*args: Any, **kwargs: Any) -> Any:
                if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                    layer.bad_input(args)
                return fast(args[0])

        else:

            def forward(*args: Any, **kwargs: Any) -> Any:
                if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                    layer.bad_input(args)
                x = args[0]
                # a shape test: under torch.compile it is a guard, not a graph break
                if x.numel() <= limit * x.shape[-1]:
                    return fast(x)
                return own(F.hardshrink(x, threshold))

        module.__dict__["forward"] = forward
        return _ForwardHandle(module, forward)


def retarget(layers: Mapping[str, Layer], levels: Mapping[str, Any]) -> None:
    """Recompute the thresholds of ``levels``' layers for new sparsity levels, from the
    statistics of their last step(); nothing changes if one fails."""
    new: dict[str, tuple[Layer, Threshold, ThresholdResult]] = {}
    for name, level in levels.items():
        layer = layers.get(name)
        if layer is None:
            raise LayerNotFoundError(
                f"no layer named {name!r} is registered (registered: "
                f"{', '.join(map(repr, layers)) or 'none'})"
            )
        mode = layer.mode
        if not isinstance(mode, Threshold):
            raise StateError(f"layer {name!r} is not in threshold mode; it cannot be retargeted")
        new[name] = (layer, mode, mode.retargeted(layer, level))
    for name, (layer, mode, result) in new.items():
        mode.set_result(result)
        key = layer.mask_strategy.target_key
        if key is not None:
            layer.set_option(key, levels[name])
        if layer.hook_state == SPARSIFY:
            layer.attach(SPARSIFY)
    warn_unreachable({name: result for name, (_, _, result) in new.items()})


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
