"""Frozen records that plugins return from their hooks.

A record carries a ``name`` (how users ask for it) and the callables that do
the work. The host validates every record, tags it with the plugin that gave
it and refuses duplicate names (see :mod:`actsparse.core._registry`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from actsparse.core._errors import ConfigError

__all__ = [
    "AggregateStrategy",
    "MaskStrategy",
    "ReduceStrategy",
    "Serializer",
    "infer_params",
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
class AggregateStrategy:
    """How a layer's inputs are folded into an accumulator, one batch at a time.

    Attributes:
        name: The name users pass as ``aggregate_fn``.
        fn: ``fn(accumulator, x) -> accumulator``. Called once per forward pass.
        init: ``init(x) -> accumulator`` builds the accumulator from the first
            input; ``None`` means ``torch.zeros_like(x)``, as torch.ao does.
        finalize: ``finalize(accumulator) -> Tensor`` turns the accumulator into
            the tensor that the reduce function receives; ``None`` passes it as is.
        elementwise: True when ``fn`` treats every position independently and
            keeps the input's shape (``x + y``). The runtime then aggregates all
            selected features with one call instead of one call per feature.
        description: One line for ``actsparse plugins`` and the docs.
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[[Any, Any], Any] = attrs.field(validator=_check_callable)
    init: Callable[[Any], Any] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    finalize: Callable[[Any], Any] | None = attrs.field(
        default=None, validator=_check_optional_callable
    )
    elementwise: bool = attrs.field(default=False, validator=_of_type(bool))
    description: str = attrs.field(default="", validator=_of_type(str))

    def __call__(self, accumulator: Any, x: Any) -> Any:
        return self.fn(accumulator, x)


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

    def __attrs_post_init__(self) -> None:
        if self.params is not None and not self.required <= self.params:
            extra = ", ".join(sorted(self.required - self.params))
            raise ConfigError(
                f"MaskStrategy.required names keys missing from MaskStrategy.params: {extra}"
            )

    def __call__(self, data: Any, **sparse_config: Any) -> Any:
        return self.fn(data, **sparse_config)

    def check_config(self, sparse_config: Mapping[str, Any], *, layer: str) -> None:
        """Raise :class:`ConfigError` unless ``sparse_config`` fits ``params``."""
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
    """

    name: str = attrs.field(validator=_check_name)
    dumps: Callable[[Any], Any] = attrs.field(validator=_check_callable)
    loads: Callable[[Any], Any] = attrs.field(validator=_check_callable)
    binary: bool = attrs.field(default=False, validator=_of_type(bool))
    suffix: str = attrs.field(default="", validator=_of_type(str))
    description: str = attrs.field(default="", validator=_of_type(str))
