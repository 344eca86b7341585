"""Threshold mode: layers whose mask strategy is ``dynamic``.

Such a layer aggregates a statistic of ``|x|`` while calibrating (the
built-in pair is the ``abs_histogram`` aggregate and the ``target_threshold``
mask), ``step()`` turns it into one threshold per layer, and after
``squash_mask()`` the entries of each input with ``|x| <= threshold`` are
zeroed before the layer runs: by default with one ``hardshrink`` call in a
pre-hook (the threshold is a Python float, rounded to the input's dtype by
the kernel), so nothing else is built per call.

A strategy with a ``scale`` (``weighted_threshold``) scores ``|x_i| * c_i``:
the aggregate receives ``x * c``, and the hook zeroes ``|x_i| <= t / c_i``
with a bound built when the hook is attached. A strategy that returns an
offset (``target_threshold`` on ``abs_histogram(feature_sums=True)``)
compensates its zeros: the layer adds ``f(offset) - f(0)`` (``W @ offset`` for
a Linear, folded into its bias) to its output, from its parameters as they are
at each call (:class:`Compensation`).

Valid positions: inside ``with sparsifier.valid_positions(mask):`` the
aggregate of every threshold-mode layer receives ``valid=mask`` reshaped to
broadcast against the layer's input (an attention mask ``(B, L)`` against an
input ``(B, L, D)``), so padding does not enter the statistics. Only an
aggregate that declares ``takes_valid`` receives it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, cast

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from actsparse.core import (
    SPARSIFY,
    ActsparseWarning,
    CalibrationWarning,
    ConfigError,
    LayerNotFoundError,
    LayerState,
    Mask,
    MaskError,
    SerializationError,
    StateError,
    ThresholdResult,
    check_offset,
)
from actsparse.hooks._layer import Handle, Layer, PreHook, no_graph

__all__ = [
    "ForwardHandle",
    "SparsityTargetWarning",
    "Threshold",
    "ValidPositions",
    "retarget",
    "warn_skipped",
    "warn_unreachable",
]


#: A masking mode that applies a threshold (:meth:`Threshold.moved_to`).
T = TypeVar("T", bound="Threshold")


class SparsityTargetWarning(ActsparseWarning):
    """A layer's target sparsity cannot be reached by a magnitude threshold: the zeros
    alone exceed it, or equal values (ties) leave no threshold within a point of it."""


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


def _fits(layer: Layer, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``scale``, after checking that it has one number per feature of ``x``'s last dim."""
    if x.ndim == 0 or x.shape[-1] != scale.shape[0]:
        raise ConfigError(
            f"layer {layer.name!r}: mask strategy {layer.mask_strategy.name!r} scores "
            f"{scale.shape[0]} input features, but the input has shape {tuple(x.shape)}"
        )
    return scale


def scored_zero(layer: Layer, threshold: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a weight-aware score, ``x`` with every entry whose score ``|x_i| * c_i`` is
    at or below ``threshold`` zeroed; None for the plain ``|x|`` score.

    The per-feature bound ``threshold / c_i`` (infinite where ``c_i`` is 0: that
    feature is never used by the layer) is built here, once; a call costs an
    ``abs``, a comparison and a ``masked_fill``.
    """
    scale = layer.score_scale()
    if scale is None:
        return None
    bound = torch.where(
        scale > 0, threshold / scale.float(), torch.full_like(scale, math.inf, dtype=torch.float32)
    )

    def zero(x: torch.Tensor) -> torch.Tensor:
        # .to: a no-op unless the model moved to another device after squashing
        return x.masked_fill(x.abs() <= _fits(layer, bound, x).to(x.device), 0)

    return zero


@attrs.frozen(eq=False)
class Outcome:
    """A threshold and, for a compensating strategy, the offset (in the input's units)."""

    result: ThresholdResult
    offset: torch.Tensor | None = None


@attrs.frozen(eq=False)
class Computed:
    """What step() computes for a threshold-mode layer: the outcome and the reduced
    statistic."""

    outcome: Outcome
    reduced: Any
    #: how many non-finite values the aggregate left out (``AggregateStrategy.skipped``)
    skipped: int = 0

    @property
    def result(self) -> ThresholdResult:
        return self.outcome.result


class _Handles:
    """Detaches several hooks at once."""

    def __init__(self, *handles: Handle) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes ``F.linear(x, weight, bias)``: an ``nn.Linear`` whose
    class keeps ``nn.Linear.forward``."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _stamp(tensors: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What tells whether ``tensors`` still hold the values they held: each one's
    identity, version counter, storage, dtype and device; None if one is an inference
    tensor, which keeps no version counter."""
    out: list[Any] = []
    for tensor in tensors:
        if tensor is None:
            out.append(None)
        elif tensor.is_inference():
            return None
        else:
            out.append(
                (id(tensor), tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device)
            )
    return tuple(out)


def _wants_graph(tensors: tuple[Any, ...]) -> bool:
    """Whether the shift must be computed in the graph: under torch.export, or with a
    gradient to compute for one of ``tensors``."""
    if torch.compiler.is_exporting():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: the compensations that :data:`KEPT_SHIFT` reads, by the slot each was given
_COMPENSATIONS: weakref.WeakValueDictionary[int, Compensation] = weakref.WeakValueDictionary()
_slots = itertools.count()
_library = torch.library.Library("actsparse", "FRAGMENT")  # type: ignore[no-untyped-call]
# cudagraph_unsafe: its check runs at each call, so a CUDA graph must not replay it
_library.define(  # type: ignore[no-untyped-call]
    "kept_shift(Tensor weight, Tensor? bias, int slot) -> Tensor",
    tags=(torch.Tag.cudagraph_unsafe,),
)


def _kept_shift(weight: torch.Tensor, bias: torch.Tensor | None, slot: int) -> torch.Tensor:
    compensation = _COMPENSATIONS.get(slot)
    if compensation is None:
        raise StateError(
            f"actsparse::kept_shift: compensation {slot} is gone (its layer was detached); "
            "compile the model again"
        )
    shift, folded = compensation.kept()
    # a copy: torch.compile may reuse an operator's output as scratch space
    return (shift if bias is None else folded).clone()


def _kept_shift_fake(weight: torch.Tensor, bias: torch.Tensor | None, slot: int) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


torch.library.impl("actsparse::kept_shift", "CompositeExplicitAutograd", _kept_shift, lib=_library)
torch.library.register_fake("actsparse::kept_shift", _kept_shift_fake, lib=_library)
#: ``actsparse::kept_shift(weight, bias, slot)``: the kept ``W @ offset`` (plus ``bias``
#: when it is given) of a compensated Linear, as one opaque node of a compiled graph.
#: The operator checks the layer's parameters as eager calls do (computing the shift
#: again after they changed) and returns a copy; the graph never reads the weight
#: for it. It is tagged ``cudagraph_unsafe``: that check must run at every call, so
#: a CUDA graph is split around it rather than replaying a stale copy.
KEPT_SHIFT: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor] = (
    torch.ops.actsparse.kept_shift.default
)


class Compensation:
    """What a compensating threshold adds to its layer's output, from the layer's
    parameters as they are at each call: ``f(offset) - f(0)`` for the module's own
    forward ``f``, ``W @ offset`` for a Linear.

    With a gradient to compute (grad mode on and a parameter that requires it), and
    under torch.export, the shift is computed in the graph at every call (one
    matrix-vector product for a Linear), so the gradients of the weight include
    its share and an exported program holds only standard operators. Otherwise a
    detached copy is kept, and computed again on the first call after a parameter
    or buffer changed: replaced, edited in place (its version counter moved:
    ``add_``, ``copy_``, ``load_state_dict``, an optimizer step), or moved to
    another device or dtype. An edit through ``.data`` moves no version counter
    and is not seen, as autograd does not see it. For a plain ``nn.Linear`` the
    kept copy is ``bias + shift``: the layer stays one ``F.linear`` call. Under
    torch.compile a Linear reads the kept copy through :data:`KEPT_SHIFT`, one
    opaque operator that makes the same check at run time, so a compiled decoding
    step does not read each weight a second time for its shift; other modules
    compute it in the graph.
    """

    def __init__(self, layer: Layer, offset: torch.Tensor) -> None:
        self._layer = layer
        self._module = layer.module
        self._offset = offset.detach()
        self.linear = _plain_linear(layer.module)
        self._stamp: tuple[Any, ...] | None = None
        # the tensors stamped, held so that their ids stay theirs
        self._held: tuple[Any, ...] = ()
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None
        self._slot = next(_slots)
        _COMPENSATIONS[self._slot] = self
        # a module that cannot take the offset fails here, when the hook is attached
        self._kept(self._tensors())

    def _tensors(self) -> tuple[Any, ...]:
        module = self._module
        if self.linear:
            return (module.weight, module.bias)
        return (*module.parameters(), *module.buffers())

    def _offset_like(self, like: object) -> torch.Tensor:
        # a no-op unless the model moved to another device or dtype after squashing
        ref = like if isinstance(like, torch.Tensor) and like.is_floating_point() else self._offset
        return self._offset.to(device=ref.device, dtype=ref.dtype)

    def compute(self) -> torch.Tensor:
        """The shift from the parameters as they are now, in the graph."""
        module = self._module
        m = self._offset_like(getattr(module, "weight", None))
        if self.linear:
            return torch.mv(cast(nn.Linear, module).weight, m)
        forward = type(module).forward
        try:
            shift: torch.Tensor = forward(module, m) - forward(module, torch.zeros_like(m))
        except Exception as exc:
            raise MaskError(
                f"layer {self._layer.name!r}: the offset that compensates its zeros needs the "
                f"layer to take one input of {m.numel()} features, and it raised {exc!r}"
            ) from exc
        return shift

    def _kept(self, tensors: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, bias + shift)`` detached (the second is the shift alone unless the
        module is a plain Linear with a bias), computed again when one of ``tensors``
        changed."""
        stamp = _stamp(tensors)
        if stamp is None or stamp != self._stamp or self._value is None:
            # never an inference tensor, so the model can still be trained afterwards
            with torch.no_grad(), torch.inference_mode(False):
                shift = self.compute().detach()
                bias = tensors[1] if self.linear else None
                folded = shift if bias is None else (bias + shift).detach()
            self._value, self._stamp, self._held = (shift, folded), stamp, tensors
        return self._value

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, bias + shift)`` detached, from the parameters as they are now."""
        return self._kept(self._tensors())

    def shift(self) -> torch.Tensor:
        """The shift for this call: in the graph when it must be, else the kept copy."""
        tensors = self._tensors()
        if _wants_graph(tensors):
            return self.compute()
        if torch.compiler.is_compiling():
            if self.linear:
                return KEPT_SHIFT(cast(nn.Linear, self._module).weight, None, self._slot)
            return self.compute()
        return self._kept(tensors)[0]

    def linear_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A plain ``nn.Linear``'s forward plus the shift: one ``F.linear`` whose bias is
        ``bias + W @ offset``."""
        module = cast(nn.Linear, self._module)

        def compensated_linear(x: torch.Tensor) -> torch.Tensor:
            weight, bias = module.weight, module.bias
            tensors = (weight, bias)
            if _wants_graph(tensors):
                m = self._offset_like(weight)
                full = torch.mv(weight, m) if bias is None else torch.addmv(bias, weight, m)
                return F.linear(x, weight, full)
            if torch.compiler.is_compiling():
                return F.linear(x, weight, KEPT_SHIFT(weight, bias, self._slot))
            return F.linear(x, weight, self._kept(tensors)[1])

        return compensated_linear

    def added(self, output: Any) -> Any:
        """``output`` plus the shift."""
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"layer {self._layer.name!r}: a compensating threshold adds to the layer's "
                f"output, which is a {type(output).__name__}, not a tensor"
            )
        # .to: a no-op unless the model moved to another device or dtype after squashing
        return output + self.shift().to(device=output.device, dtype=output.dtype)

    def forward(self) -> Callable[..., Any]:
        """The module's own forward plus the shift."""
        if self.linear:
            return self.linear_forward()
        own = type(self._module).forward.__get__(self._module)

        def shifted(*args: Any, **kwargs: Any) -> Any:
            return self.added(own(*args, **kwargs))

        return shifted

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """A forward hook that adds the shift to the output."""
        return self.added(output)


class ForwardHandle:
    """Restores a module's own ``forward`` when what replaced it is detached."""

    def __init__(self, module: nn.Module, forward: Any) -> None:
        self._module = module
        self._forward = forward

    def remove(self) -> None:
        module = self._module
        if module.__dict__.get("forward") is self._forward:
            del module.__dict__["forward"]


class Threshold:
    """One threshold per layer, computed by ``step()``; the entries whose score is at or
    below it are zeroed, and a compensating strategy's offset is added to the output."""

    kind = "threshold"

    def __init__(self, valid: ValidPositions) -> None:
        self._valid = valid
        self._result: ThresholdResult | None = None
        self._offset: torch.Tensor | None = None
        # the reduced statistic of the last step(), for retargeting
        self._reduced: Any = None

    @property
    def mask(self) -> Mask | None:
        return None

    @property
    def threshold(self) -> ThresholdResult | None:
        return self._result

    @property
    def offset(self) -> torch.Tensor | None:
        return self._offset

    @property
    def ready(self) -> bool:
        return self._result is not None

    def moved_to(self, factory: Callable[[ValidPositions], T]) -> T:
        """A new mode from ``factory(valid positions)`` holding this mode's threshold, offset
        and statistics: the same calibration, applied another way."""
        new = factory(self._valid)
        new._result, new._offset, new._reduced = self._result, self._offset, self._reduced
        return new

    @property
    def retargetable(self) -> bool:
        """Whether the statistics of a step() in this process are at hand."""
        return self._reduced is not None

    # ------------------------------------------------------------ aggregation

    def aggregate_hook(self, layer: Layer) -> PreHook:
        fn = layer.bound.fn
        init = layer.bound.init or torch.zeros_like
        holder = self._valid if layer.aggregate.takes_valid else None
        # a weight-aware score: the aggregate sees x * scale (built here, once)
        scale = layer.score_scale()

        def threshold_aggregate_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = no_graph(
                args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
            )
            if scale is not None:
                x = x * _fits(layer, scale, x)
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
        if self.zeroes_nothing(layer):
            # hardshrink at a threshold <= 0 zeroes only zeros, and a zero offset adds
            # nothing: the layer runs as it is, without a hook to call (a target of 0%)
            return _Handles()
        zero = scored_zero(layer, threshold)
        compensation = None if self._offset is None else Compensation(layer, self._offset)
        if zero is not None:

            def scored_sparsify_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
                return (zero(x), *args[1:])

            handle = layer.module.register_forward_pre_hook(scored_sparsify_hook)
        else:
            handle = layer.module.register_forward_pre_hook(self._plain_hook(layer, threshold))
        if compensation is None:
            return handle
        module = layer.module
        if compensation.linear:
            # the shift joins the bias: one F.linear call, as without compensation
            forward = compensation.linear_forward()
            module.__dict__["forward"] = forward
            return _Handles(handle, ForwardHandle(module, forward))
        return _Handles(handle, module.register_forward_hook(compensation.hook))

    def zeroes_nothing(self, layer: Layer) -> bool:
        """Whether the squashed layer would run as it is: the plain ``|x|`` score at a
        threshold of at most 0 (only zeros are zeroed) and no offset, or a zero one."""
        result = self._result
        if result is None or result.threshold > 0 or layer.score_scale() is not None:
            return False
        return self._offset is None or not bool(self._offset.any())

    def input_change(self, layer: Layer) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``x -> zeroed(x) - x + offset``: what the squashed hook changes in the layer's
        input ``x``, its zeros and the offset that compensates them, as the hook computes
        them. A plain ``nn.Linear`` then changes its output by ``W`` times this; None for
        any other module, whose change is not a function of its input's alone."""
        result = self._result
        if result is None or not _plain_linear(layer.module):
            return None
        threshold = result.threshold
        zero = scored_zero(layer, threshold)
        offset = self._offset

        def change(x: torch.Tensor) -> torch.Tensor:
            zeroed = F.hardshrink(x, threshold) if zero is None else zero(x)
            delta = zeroed - x
            return delta if offset is None else delta + offset.to(delta)

        return change

    @staticmethod
    def _plain_hook(layer: Layer, threshold: float) -> PreHook:

        def threshold_sparsify_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            # hardshrink keeps x where |x| > t and writes 0 elsewhere: one kernel, and
            # the threshold is a Python float, so nothing else is built per call.
            x = args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
            return (F.hardshrink(x, threshold), *args[1:])

        return threshold_sparsify_hook

    # ------------------------------------------------------------------ step

    def compute(self, layer: Layer, data: Any) -> Computed:
        reduced = layer.reduce_data(data, f"layer {layer.name!r}", "threshold")
        outcome = self.result_for(layer, reduced, layer.mask_options)
        return Computed(outcome, reduced, self._skipped(layer, data))

    @staticmethod
    def _skipped(layer: Layer, data: Any) -> int:
        """How many non-finite values the layer's aggregate left out of ``data``."""
        skipped = layer.bound.skipped
        if skipped is None:
            return 0
        try:
            count = skipped(data)
        except Exception as exc:
            raise MaskError(
                f"layer {layer.name!r}: aggregate {layer.aggregate.name!r} could not count the "
                f"non-finite values it skipped: {exc!r}"
            ) from exc
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise MaskError(
                f"layer {layer.name!r}: aggregate {layer.aggregate.name!r} counted {count!r} "
                "skipped values, not an int >= 0"
            )
        return count

    def store(self, computed: Computed) -> None:
        self.set_result(computed.outcome)
        self._reduced = computed.reduced

    def result_for(self, layer: Layer, reduced: Any, options: Mapping[str, Any]) -> Outcome:
        """Call the layer's dynamic mask strategy on ``reduced`` and check what it returns."""
        where = f"layer {layer.name!r}"
        out = layer.call_mask_strategy(reduced, options, where, "threshold")
        name = layer.mask_strategy.name
        if not isinstance(out, tuple) or len(out) not in (3, 4):
            raise MaskError(
                f"{where}: dynamic mask strategy {name!r} returned "
                f"{type(out).__name__}, not (threshold, expected_sparsity, zero_fraction) "
                "or (threshold, expected_sparsity, zero_fraction, offset)"
            )
        key = layer.mask_strategy.target_key
        target: Any = options.get(key, out[1]) if key is not None else out[1]
        try:
            result = ThresholdResult(out[0], target, out[1], out[2])
        except (ConfigError, TypeError, ValueError) as exc:
            raise MaskError(
                f"{where}: dynamic mask strategy {name!r} returned {out[:3]!r}: {exc}"
            ) from exc
        offset = out[3] if len(out) == 4 else None
        if offset is not None:
            offset = self._input_offset(
                layer, offset, f"{where}: the offset that {name!r} returned"
            )
        return Outcome(result, offset)

    @staticmethod
    def _input_offset(layer: Layer, offset: object, where: str) -> torch.Tensor:
        """``offset`` checked and, for a weight-aware score, divided by the scale: the
        aggregate saw ``x * scale``."""
        try:
            checked = check_offset(offset, where)
        except SerializationError as exc:
            raise MaskError(str(exc)) from None
        width = layer.input_shape[-1] if layer.input_shape else None
        if width is not None and checked.numel() != width:
            raise MaskError(
                f"{where} holds {checked.numel()} numbers, the layer's input has {width} features"
            )
        checked = checked.detach().to(torch.float32)
        scale = layer.score_scale()
        if scale is not None:
            scale = scale.to(checked.device)
            checked = torch.where(scale > 0, checked / scale, 0.0)
        return checked

    def retargeted(self, layer: Layer, level: Any) -> Outcome:
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

    def set_result(self, outcome: Outcome) -> None:
        """Replace the threshold and offset (``retarget``); the hook attached reads them when
        re-attached."""
        self._result = outcome.result
        self._offset = outcome.offset

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
        if state.offset is not None:
            width = getattr(layer.module, "in_features", None)
            if isinstance(width, int) and state.offset.numel() != width:
                raise SerializationError(
                    f"layer {layer.name!r}: its offset holds {state.offset.numel()} numbers, "
                    f"the layer takes {width} input features"
                )
        self._result = state.threshold
        self._offset = None if state.offset is None else state.offset.float()
        self._reduced = None


def retarget(layers: Mapping[str, Layer], levels: Mapping[str, Any]) -> None:
    """Recompute the thresholds of ``levels``' layers for new sparsity levels, from the
    statistics of their last step(); nothing changes if one fails."""
    new: dict[str, tuple[Layer, Threshold, Outcome]] = {}
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
    for name, (layer, mode, outcome) in new.items():
        mode.set_result(outcome)
        key = layer.mask_strategy.target_key
        if key is not None:
            layer.set_option(key, levels[name])
        if layer.hook_state == SPARSIFY:
            layer.attach(SPARSIFY)
    warn_unreachable({name: outcome.result for name, (_, _, outcome) in new.items()})


def warn_unreachable(results: Mapping[str, ThresholdResult]) -> None:
    bad = {name: r for name, r in results.items() if not r.reachable}
    zeros = {name: r for name, r in bad.items() if r.zeros_exceed_target}
    _warn_target(
        zeros,
        lambda r: f"zeros alone {r.zero_fraction:.3f}",
        "no threshold reaches the target sparsity of layer(s) {}: their inputs hold more "
        "zeros than the target, so they will be sparser than asked; see "
        "sparsifier.thresholds for each layer's expected sparsity",
    )
    _warn_target(
        {name: r for name, r in bad.items() if name not in zeros},
        lambda r: f"reached {r.expected_sparsity:.3f}",
        "the histogram places no threshold within a point of the target sparsity of "
        "layer(s) {}: the bin of magnitudes that holds the target holds more than a point of "
        "the calibration inputs, and they do not spread across it (equal values, a pile-up "
        "at one magnitude such as a GELU's minimum, or too few inputs), so the threshold "
        "sits at the nearer edge of that bin; sparsifier.thresholds holds what it zeroes of "
        "the calibration inputs",
    )


def _warn_target(
    results: Mapping[str, ThresholdResult], detail: Callable[[ThresholdResult], str], text: str
) -> None:
    """One :class:`SparsityTargetWarning`: ``text`` with the layers of ``results`` shown."""
    if results:
        shown = ", ".join(
            f"{name!r} (target {r.target:.3f}, {detail(r)})" for name, r in results.items()
        )
        warnings.warn(text.format(shown), SparsityTargetWarning, stacklevel=4)


def warn_skipped(skipped: Mapping[str, int]) -> None:
    """One :class:`CalibrationWarning` naming every layer whose aggregate skipped
    non-finite values, with each count."""
    bad = {name: count for name, count in skipped.items() if count}
    if not bad:
        return
    shown = ", ".join(f"{name!r} ({count} non-finite values)" for name, count in bad.items())
    warnings.warn(
        f"calibration skipped NaN or inf among the inputs of layer(s) {shown}: their "
        "thresholds come from the finite values alone; check the calibration data (or the "
        "model, if a layer overflows)",
        CalibrationWarning,
        stacklevel=3,
    )
