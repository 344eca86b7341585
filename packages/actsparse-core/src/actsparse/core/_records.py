"""Frozen records that plugins return from their hooks.

A record carries a ``name`` (how users ask for it) and the callables that do
the work. The host validates every record, tags it with the plugin that gave
it and refuses duplicate names (see :mod:`actsparse.core._registry`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from actsparse.core._errors import ConfigError

__all__ = [
    "COMBINE_OPS",
    "SNIFF_BYTES",
    "AggregateStrategy",
    "BoundAggregate",
    "KernelStrategy",
    "MaskStrategy",
    "ReduceStrategy",
    "Serializer",
    "Tolerance",
    "check_values",
    "infer_params",
    "split_sparse_config",
]


def _check_name(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ConfigError(
            f"{type(instance).__name__}.{attribute.name} must be a non-empty string "
            f"without surrounding whitespace, got {value!r}"
        )


def _check_callable(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not callable(value):
        raise ConfigError(
            f"{type(instance).__name__}.{attribute.name} must be callable, got {value!r}"
        )


def _check_optional_callable(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if value is not None:
        _check_callable(instance, attribute, value)


def _of_type(kind: type) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(
                f"{type(instance).__name__}.{attribute.name} must be a {kind.__name__}, "
                f"got {value!r}"
            )

    return check


def _to_keys(value: Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset((value,))
    return frozenset(value)


def _to_required(value: Iterable[str] | None) -> frozenset[str]:
    keys = _to_keys(value)
    return frozenset() if keys is None else keys


def _check_keys(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    keys: frozenset[object] = value  # type: ignore[assignment]
    bad = sorted(repr(k) for k in keys if not isinstance(k, str) or not k.isidentifier())
    if bad:
        raise ConfigError(
            f"{type(instance).__name__}.{attribute.name} must hold parameter names "
            f"(identifiers), got {', '.join(bad)}"
        )


#: The collective reductions that ``AggregateStrategy.combine`` may name.
COMBINE_OPS = ("sum", "max", "min")

CombineSpec = str | tuple[str, ...] | Callable[..., Any]


def _to_combine(value: object) -> object:
    if isinstance(value, list):
        return tuple(value)
    return value


def _check_combine(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None or (callable(value) and not isinstance(value, str)):
        return
    ops = value if isinstance(value, tuple) else (value,)
    if ops and all(isinstance(op, str) and op in COMBINE_OPS for op in ops):
        return
    raise ConfigError(
        f"{type(instance).__name__}.{attribute.name} must be None, one of "
        f"{', '.join(map(repr, COMBINE_OPS))}, a non-empty list of those (one per row of "
        f"the accumulator along dim 0), or a callable combine(accumulator, group), "
        f"got {value!r}"
    )


def infer_params(fn: Callable[..., Any]) -> tuple[frozenset[str] | None, frozenset[str]]:
    """Return the keyword parameters that ``fn`` accepts after its data argument.

    The first element is ``None`` when ``fn`` takes ``**kwargs`` or its
    signature cannot be read (anything goes); the second holds the parameters
    without a default.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, frozenset()
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted: frozenset[str] | None = None
    else:
        accepted = frozenset()
    required: set[str] = set()
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    # The first positional parameter receives the data; the rest are sparse_config keys.
    skipped_data = False
    for p in params:
        if not skipped_data and p.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            skipped_data = True
            continue
        if p.kind in keyword_kinds:
            if accepted is not None:
                accepted = accepted | {p.name}
            if p.default is inspect.Parameter.empty:
                required.add(p.name)
    return accepted, frozenset(required)


@attrs.frozen
class BoundAggregate:
    """An aggregate strategy's callables with its ``sparse_config`` options applied.

    The runtime builds one per registered layer, once, so the forward hook
    calls plain functions of the data.
    """

    fn: Callable[[Any, Any], Any]
    init: Callable[[Any], Any] | None
    finalize: Callable[[Any], Any] | None
    feature_axis: Callable[[int, int], int] | None
    #: a named reduction (or one per row) as declared, or the callable with options applied
    combine: CombineSpec | None = None
    #: ``skipped(accumulator) -> int``: how many non-finite values ``fn`` left out
    skipped: Callable[[Any], int] | None = None


def _bind(fn: Callable[..., Any] | None, options: Mapping[str, Any]) -> Any:
    if fn is None or not options:
        return fn
    return functools.partial(fn, **options)


@attrs.frozen
class AggregateStrategy:
    """How a layer's inputs are folded into an accumulator, one batch at a time.

    Attributes:
        name: The name users pass as ``aggregate_fn``.
        fn: ``fn(accumulator, x, **options) -> accumulator``. Called once per
            forward pass.
        init: ``init(x, **options) -> accumulator`` builds the accumulator from
            the first input; ``None`` means ``torch.zeros_like(x)``, as torch.ao does.
        finalize: ``finalize(accumulator, **options) -> Tensor`` turns the
            accumulator into the tensor that the reduce function receives;
            ``None`` passes it as is.
        elementwise: True when ``fn`` treats every position independently and
            keeps the input's shape (``x + y``). The runtime then aggregates all
            selected features with one call instead of one call per feature.
        feature_axis: For accumulators that do not keep the input's shape:
            ``feature_axis(dim, ndim, **options) -> int`` names the dimension of
            the accumulator (and of the finalized tensor) that holds dimension
            ``dim`` (non-negative) of an ``ndim``-dimensional input, and raises
            :class:`ConfigError` when the strategy folds that dimension away.
            With it the runtime aggregates all selected features with one call,
            like ``elementwise``, and splits the accumulator along that axis.
        params: The ``sparse_config`` keys the strategy takes as ``options``
            (passed to ``fn``, ``init``, ``finalize``, ``feature_axis`` and a
            callable ``combine``);
            the mask strategy does not receive them unless it declares them too.
        required: The keys that must be present.
        description: One line for ``actsparse plugins`` and the docs.
        combine: How accumulators built by several processes merge into the one
            that a single process would have built from all their inputs;
            ``step()`` uses it under ``torch.distributed``. One of
            :data:`COMBINE_OPS` (``"sum"``, ``"max"``, ``"min"``: an all-reduce
            of the whole accumulator), a list of them with one entry per row
            of the accumulator along dim 0 (``["max", "sum"]`` for a running
            maximum in row 0 and a sample count in row 1), or a callable
            ``combine(accumulator, group, **options) -> accumulator`` that
            runs collectives on ``group`` itself (a merge of quantile
            sketches, say) and returns the combined accumulator; it receives
            a copy it may change in place, and every process calls it.
            ``None`` (the default) means the accumulator cannot be combined:
            ``step()`` then refuses to run across processes.
        takes_valid: True when ``fn`` accepts a keyword ``valid``: a bool
            tensor that broadcasts to ``x`` and is False at positions that
            must not be counted (padding). In threshold mode, inside
            ``sparsifier.valid_positions(mask)``, the runtime passes it on
            every call; a threshold-mode layer whose aggregate does not take
            it makes ``valid_positions()`` an error.
        check: ``check(options) -> None`` checks the values of the strategy's
            ``sparse_config`` keys (``options`` holds those of ``params``
            that the layer sets) when a layer is registered, and raises
            :class:`ConfigError` naming the key at fault; the runtime adds
            the layer's and the strategy's names. ``None``: values are
            checked only when the strategy runs, during calibration.
        skipped: ``skipped(accumulator, **options) -> int``, for an aggregate
            that leaves non-finite values (NaN, inf) out of its statistic:
            how many it left out. ``step()`` reads it and warns with
            :class:`CalibrationWarning`, naming each layer and its count.
            ``None``: the aggregate skips nothing (a NaN then reaches the
            reduced data, and ``step()`` refuses it).
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[..., Any] = attrs.field(validator=_check_callable)
    init: Callable[..., Any] | None = attrs.field(default=None, validator=_check_optional_callable)
    finalize: Callable[..., Any] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    elementwise: bool = attrs.field(default=False, validator=_of_type(bool))
    feature_axis: Callable[..., int] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    params: frozenset[str] = attrs.field(
        factory=frozenset, converter=_to_required, validator=_check_keys
    )
    required: frozenset[str] = attrs.field(
        factory=frozenset, converter=_to_required, validator=_check_keys
    )
    description: str = attrs.field(default="", validator=_of_type(str))
    combine: CombineSpec | None = attrs.field(
        default=None, converter=_to_combine, validator=_check_combine
    )
    takes_valid: bool = attrs.field(default=False, validator=_of_type(bool))
    check: Callable[[Mapping[str, Any]], None] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    skipped: Callable[..., int] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )

    def __attrs_post_init__(self) -> None:
        if not self.required <= self.params:
            extra = ", ".join(sorted(self.required - self.params))
            raise ConfigError(
                f"AggregateStrategy.required names keys missing from "
                f"AggregateStrategy.params: {extra}"
            )
        if self.elementwise and self.feature_axis is not None:
            raise ConfigError(
                "AggregateStrategy.elementwise and AggregateStrategy.feature_axis exclude "
                "each other: an elementwise accumulator keeps every input dimension in place"
            )

    def __call__(self, accumulator: Any, x: Any) -> Any:
        return self.fn(accumulator, x)

    def bind(self, options: Mapping[str, Any]) -> BoundAggregate:
        """The strategy's callables with ``options`` (its ``sparse_config`` keys) applied."""
        return BoundAggregate(
            fn=_bind(self.fn, options),
            init=_bind(self.init, options),
            finalize=_bind(self.finalize, options),
            feature_axis=_bind(self.feature_axis, options),
            combine=_bind(self.combine, options) if callable(self.combine) else self.combine,
            skipped=_bind(self.skipped, options),
        )


@attrs.frozen
class ReduceStrategy:
    """How the aggregated data is reduced before the mask is computed.

    Attributes:
        name: The name users pass as ``reduce_fn``.
        fn: ``fn(aggregated) -> Tensor``.
        description: One line for ``actsparse plugins`` and the docs.
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[[Any], Any] = attrs.field(validator=_check_callable)
    description: str = attrs.field(default="", validator=_of_type(str))

    def __call__(self, data: Any) -> Any:
        return self.fn(data)


@attrs.frozen
class MaskStrategy:
    """How a mask is computed from the reduced data.

    Attributes:
        name: The name users pass as ``mask_fn``.
        fn: ``fn(reduced, **sparse_config) -> Tensor`` of zeros and ones that
            broadcasts against the layer's input (or the selected feature).
        params: The ``sparse_config`` keys ``fn`` accepts; ``None`` accepts any.
        required: The keys that must be present.
        description: One line for ``actsparse plugins`` and the docs.
        dynamic: True for a threshold strategy: ``fn(reduced, **sparse_config)``
            returns ``(threshold, expected_sparsity, zero_fraction)`` (floats)
            instead of a mask, and after ``squash_mask()`` the layer zeroes,
            per input, the entries whose score (``|x|``; see ``scale``) is at
            most ``threshold``. A fourth element may follow: an offset, a
            1-D float tensor with one number per input feature, the mean of
            the values the threshold zeroes; the layer then adds the
            offset's contribution (``f(offset) - f(0)`` for its own forward
            ``f``) to its output.
        target_key: For a dynamic strategy, the ``sparse_config`` key that
            holds the target sparsity (``"sparsity_level"`` for the built-in
            ``target_threshold``): ``ThresholdResult.target`` reads it and
            ``sparsifier.retarget()`` moves it. ``None``: the strategy cannot
            be retargeted.
        check: ``check(sparse_config) -> None`` checks the values of the keys
            the strategy receives when a layer is registered (and when
            ``update_config()`` changes them), and raises :class:`ConfigError`
            naming the key at fault (``"sparsity_level must be a number in
            [0, 1], got '0.5'"``); the runtime adds the layer's and the
            strategy's names. It runs after the keys were checked against
            ``params`` and ``required``. ``None``: values are checked only
            when ``fn`` runs, at ``step()``.
        scale: For a dynamic strategy, what makes the score weight-aware:
            ``scale(layer) -> Tensor`` gives one non-negative number ``c_i``
            per input feature (the input's last dimension) from the module
            that consumes the input, such as the column norms
            ``||W[:, i]||`` of an ``nn.Linear``. The layer then aggregates
            and thresholds the score ``|x_i| * c_i`` instead of ``|x_i|``:
            calibration feeds ``x * c`` to the aggregate, and after
            ``squash_mask()`` the entries whose score is at or below the
            threshold are zeroed. It is called when a hook is attached,
            never per forward call, and raises :class:`ConfigError` for a
            module it cannot score. ``None``: the score is ``|x|``.
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[..., Any] = attrs.field(validator=_check_callable)
    params: frozenset[str] | None = attrs.field(
        default=None, converter=_to_keys, validator=_check_keys
    )
    required: frozenset[str] = attrs.field(
        factory=frozenset, converter=_to_required, validator=_check_keys
    )
    description: str = attrs.field(default="", validator=_of_type(str))
    dynamic: bool = attrs.field(default=False, validator=_of_type(bool))
    target_key: str | None = attrs.field(default=None)
    check: Callable[[Mapping[str, Any]], None] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    scale: Callable[[Any], Any] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )

    @scale.validator
    def _check_scale(self, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and not self.dynamic:
            raise ConfigError(
                "MaskStrategy.scale is only meaningful with dynamic=True (a threshold "
                "strategy): a static mask strategy has no score to weigh"
            )

    @target_key.validator
    def _check_target_key(self, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None:
            return
        if not isinstance(value, str) or not value.isidentifier():
            raise ConfigError(
                f"MaskStrategy.target_key must be a parameter name (an identifier) or None, "
                f"got {value!r}"
            )
        if not self.dynamic:
            raise ConfigError(
                "MaskStrategy.target_key is only meaningful with dynamic=True (a threshold "
                "strategy); a static mask strategy has no target to move"
            )
        if self.params is not None and value not in self.params:
            raise ConfigError(
                f"MaskStrategy.target_key {value!r} is missing from MaskStrategy.params"
            )

    def __attrs_post_init__(self) -> None:
        if self.params is not None and not self.required <= self.params:
            extra = ", ".join(sorted(self.required - self.params))
            raise ConfigError(
                f"MaskStrategy.required names keys missing from MaskStrategy.params: {extra}"
            )

    def __call__(self, data: Any, **sparse_config: Any) -> Any:
        return self.fn(data, **sparse_config)

    def check_config(self, sparse_config: Mapping[str, Any], *, layer: str) -> None:
        """Raise :class:`ConfigError` unless ``sparse_config`` fits ``params``,
        ``required`` and ``check``."""
        keys = set(sparse_config)
        problems = []
        if self.params is not None:
            unknown = sorted(keys - self.params)
            if unknown:
                problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}")
        missing = sorted(self.required - keys)
        if missing:
            problems.append(f"missing key(s) {', '.join(map(repr, missing))}")
        if problems:
            accepted = (
                "any key"
                if self.params is None
                else (", ".join(map(repr, sorted(self.params))) or "no keys")
            )
            raise ConfigError(
                f"layer {layer!r}: sparse_config for mask strategy {self.name!r} has "
                f"{' and '.join(problems)}; it accepts {accepted}"
            )
        check_values(self, sparse_config, layer=layer)


def check_values(
    strategy: AggregateStrategy | MaskStrategy, options: Mapping[str, Any], *, layer: str
) -> None:
    """Run ``strategy.check`` on ``options``; a refusal is a :class:`ConfigError` naming
    the layer and the strategy.

    A checker that raises ``TypeError`` or ``ValueError`` instead of
    ``ConfigError`` (comparing a string with a number, say) is reported the
    same way, its exception chained.
    """
    check = strategy.check
    if check is None:
        return
    label = "mask strategy" if isinstance(strategy, MaskStrategy) else "aggregate strategy"
    try:
        check(dict(options))
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"layer {layer!r}: sparse_config for {label} {strategy.name!r}: {exc}"
        ) from exc


def _accepted(params: frozenset[str] | None) -> str:
    if params is None:
        return "any key"
    return ", ".join(map(repr, sorted(params))) or "no keys"


def split_sparse_config(
    aggregate: AggregateStrategy,
    mask: MaskStrategy,
    sparse_config: Mapping[str, Any],
    *,
    layer: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route a layer's ``sparse_config`` to its aggregate and mask strategies.

    The aggregate receives the keys it declares in ``params``; the mask
    receives every other key, and also those that it declares itself. A key
    that neither accepts, or a required key that is absent, is a
    :class:`ConfigError` naming the layer, the strategies and the keys they
    accept; so is a value that a strategy's ``check`` refuses.

    Returns:
        ``(aggregate_options, mask_options)``.
    """
    if not aggregate.params:
        mask.check_config(sparse_config, layer=layer)
        check_values(aggregate, {}, layer=layer)
        return {}, dict(sparse_config)
    aggregate_options = {k: v for k, v in sparse_config.items() if k in aggregate.params}
    mask_options = {
        k: v
        for k, v in sparse_config.items()
        if k not in aggregate.params or (mask.params is not None and k in mask.params)
    }
    problems = []
    unknown = sorted(
        k
        for k in sparse_config
        if k not in aggregate.params and mask.params is not None and k not in mask.params
    )
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}")
    missing = sorted(
        (aggregate.required - set(sparse_config)) | (mask.required - set(sparse_config))
    )
    if missing:
        problems.append(f"missing key(s) {', '.join(map(repr, missing))}")
    if problems:
        raise ConfigError(
            f"layer {layer!r}: sparse_config for mask strategy {mask.name!r} and aggregate "
            f"strategy {aggregate.name!r} has {' and '.join(problems)}; mask strategy "
            f"{mask.name!r} accepts {_accepted(mask.params)}, aggregate strategy "
            f"{aggregate.name!r} accepts {_accepted(aggregate.params)}"
        )
    check_values(aggregate, aggregate_options, layer=layer)
    check_values(mask, mask_options, layer=layer)
    return aggregate_options, mask_options


#: How many leading bytes of a file ``Serializer.sniff`` receives.
SNIFF_BYTES = 64


@attrs.frozen
class Serializer:
    """Converts a sparsifier state dict to a stored form and back.

    Attributes:
        name: The name users pass as ``format``.
        dumps: ``dumps(state_dict) -> stored``; ``stored`` is ``bytes`` when
            ``binary`` is true (a file format), else an in-memory object.
        loads: ``loads(stored) -> state_dict`` with dense masks, the shape that
            ``ActivationSparsifier.load_state_dict`` accepts.
        binary: Whether ``dumps`` returns bytes that can be written to a file.
        suffix: The usual file suffix of a binary format, such as ``".safetensors"``.
        description: One line for ``actsparse plugins`` and the docs.
        sniff: For a binary format, ``sniff(head) -> bool`` says whether a
            file whose first bytes are ``head`` (at most :data:`SNIFF_BYTES`,
            fewer for a shorter file) is in this format. ``load()`` and
            ``actsparse inspect`` detect a file's format by asking every
            registered format; ``None``: the format is read only when named.
    """

    name: str = attrs.field(validator=_check_name)
    dumps: Callable[[Any], Any] = attrs.field(validator=_check_callable)
    loads: Callable[[Any], Any] = attrs.field(validator=_check_callable)
    binary: bool = attrs.field(default=False, validator=_of_type(bool))
    suffix: str = attrs.field(default="", validator=_of_type(str))
    description: str = attrs.field(default="", validator=_of_type(str))
    sniff: Callable[[bytes], bool] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )

    def __attrs_post_init__(self) -> None:
        if self.sniff is not None and not self.binary:
            raise ConfigError(
                "Serializer.sniff needs binary=True: only file formats are detected from bytes"
            )

    def recognises(self, head: bytes) -> bool:
        """Whether ``head`` (a file's first bytes) is in this format; False if it cannot tell."""
        if self.sniff is None:
            return False
        try:
            return bool(self.sniff(head))
        except Exception:
            return False


def _check_tolerance_number(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"Tolerance.{attribute.name} must be a finite number >= 0, got {value!r}")


@attrs.frozen
class Tolerance:
    """How far a lossy kernel's outputs may lie from the dense layer on its own weights.

    For every output ``j`` of a layer computed by the kernel, with ``x'`` the
    input after zeroing (``|x| <= threshold`` set to 0), ``W`` and ``b`` the
    layer's weight and bias as ``KernelStrategy.apply`` leaves them (a lossy
    kernel may have replaced their values, by their quantized values for
    example; a kernel with a ``release`` writes them back there) and
    ``ref = F.linear(x', W, b)``::

        |y_j - ref_j| <= rtol * S_j + atol,   S_j = |b_j| + sum_i |x'_i * W_ji|

    on top of the rounding that any order of the sum allows. ``S_j`` is the
    size of the sum, so the bound follows the scale of the layer. NaN and
    infinite outputs must match the reference's exactly.

    Attributes:
        rtol: The bound relative to ``S_j``.
        atol: The absolute bound.
    """

    rtol: float = attrs.field(converter=float, validator=_check_tolerance_number)  # type: ignore[misc]
    atol: float = attrs.field(default=0.0, converter=float, validator=_check_tolerance_number)  # type: ignore[misc]


def _check_tolerance(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, Tolerance):
        raise ConfigError(
            f"KernelStrategy.tolerance must be None (an exact kernel) or a Tolerance (a lossy "
            f"one), got {value!r}"
        )


@attrs.frozen
class KernelStrategy:
    """How a threshold-mode layer is computed once squashed: zero ``|x| <= t``, then the layer.

    A kernel may compute both steps at once and skip the work that the zeros
    make useless (a matrix-vector product needs only the weight columns of
    the nonzero inputs). Which kernel runs is a property of the machine, never
    of the saved state: ``squash_mask(kernel=...)`` or ``set_kernel()`` picks
    it by name, or ``"auto"`` picks the fastest one per call.

    Attributes:
        name: The name users pass as ``kernel``.
        supports: ``supports(module) -> str | None``: None when the kernel can
            compute ``module`` (its type, dtype and device), else the reason
            it cannot, for the error message.
        apply: ``apply(module, threshold) -> fn`` where ``fn(x)`` returns
            ``module(x with |x| <= threshold zeroed)`` for inputs of shape
            ``(*, in_features)``. It may change how the module stores its
            parameters (once, keeping one copy of every weight); only a
            lossy kernel (see ``tolerance``) may change their values.
            ``None`` is the runtime's own path: a pre-hook that zeroes with
            ``hardshrink``, then the module's forward.
        available: ``available() -> str | None``: None when this machine can
            run the kernel now, else what is missing (a compiler, a GPU, a
            package). Called when a kernel is chosen, never per call.
        crossover: ``crossover(module, sparsity) -> int``: the largest number
            of tokens (rows of ``x``) at which the kernel is faster than the
            dense layer at that input sparsity, measured on this machine
            (0: never). ``"auto"`` uses the kernel up to that count and the
            dense path above it; ``None`` means ``"auto"`` never picks it.
        tolerance: ``None`` for an exact kernel: its outputs equal the dense
            layer's up to the order of the float sums, and ``apply`` changes
            how the module stores its parameters, never their values. A
            :class:`Tolerance` for a lossy kernel: ``apply`` may replace the
            values of the module's weights (quantizing them, say; the
            ``dense`` kernel then computes with the new values), and the
            outputs lie within the tolerance of the dense layer on those
            weights. ``"auto"`` picks only exact kernels; a lossy one runs
            when it is named.
        release: ``release(module) -> None``, called by the runtime when it
            detaches the kernel from a module that ``apply`` was given (another
            kernel is set, the layer is unsquashed or squashed again). A kernel
            that keeps the module's weights in a storage of its own (quantized
            bytes in place of the float weights) writes them back here as
            ordinary parameters (the dequantized values), so that the dense
            path, ``state_dict()`` and the next ``apply`` see them. The weights
            "as ``apply`` left them" are those after ``release``. Called once
            per ``apply``; ``None``: nothing to give back.
        description: One line for ``actsparse plugins`` and the docs.
    """

    name: str = attrs.field(validator=_check_name)
    supports: Callable[[Any], str | None] = attrs.field(validator=_check_callable)
    apply: Callable[[Any, float], Callable[[Any], Any]] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    available: Callable[[], str | None] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    crossover: Callable[[Any, float], int] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    tolerance: Tolerance | None = attrs.field(default=None, validator=_check_tolerance)
    release: Callable[[Any], None] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    description: str = attrs.field(default="", validator=_of_type(str))

    @property
    def exact(self) -> bool:
        """Whether the kernel matches the dense layer up to summation order (no tolerance)."""
        return self.tolerance is None

    def unavailable(self) -> str | None:
        """What this machine lacks to run the kernel, or None."""
        return None if self.available is None else self.available()
