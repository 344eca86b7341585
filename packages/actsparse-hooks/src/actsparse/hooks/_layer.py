"""One registered layer: its configuration, resolved strategies, accumulator and hook.

What the layer does with its data is its masking mode's business: an object
with the small interface :class:`MaskingMode` below. The runtime ships three
implementations:

* :class:`~actsparse.hooks._static.StaticMask`: ``step()`` computes a {0, 1}
  mask, and the layer's input is multiplied by it (torch.ao's behaviour);
* :class:`~actsparse.hooks._threshold.Threshold`: ``step()`` computes one
  threshold, and the entries of each input whose score (``|x|``, or
  ``|x| * scale`` with a weight-aware strategy) is at or below it are zeroed
  before the layer runs; a compensating strategy also gives an offset whose
  contribution is added to the layer's output;
* :class:`~actsparse.hooks._execution.KernelThreshold`: the same threshold,
  applied by a registered kernel that computes the layer itself and skips
  the zeroed inputs.

A mode keeps its own state (the mask, the threshold, the statistics to
retarget from); nothing outside reads its private attributes. The layer gives
the modes what they share: feature indices, the accumulator, the strategies
and the errors they raise. The protocol lives here, beside the layer that
uses it, so that no module imports one that imports it back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import torch
from torch import nn

from actsparse.core import (
    AGGREGATE,
    CONFIG_KEYS,
    FEATURE_DIM_KEY,
    FEATURES_KEY,
    SPARSE_CONFIG_KEY,
    SPARSIFY,
    STRATEGY_KEYS,
    ActsparseError,
    AggregateStrategy,
    BoundAggregate,
    ConfigError,
    LayerState,
    Mask,
    MaskError,
    MaskStrategy,
    ReduceStrategy,
    Registry,
    SerializationError,
    StrategyError,
    ThresholdResult,
    UnknownStrategyError,
    split_sparse_config,
)

__all__ = [
    "FeatureSpec",
    "Handle",
    "Layer",
    "MaskingMode",
    "PreHook",
    "changed_options",
    "check_mask",
    "no_graph",
    "resolve_config",
]

#: A forward pre-hook: ``hook(module, args)`` returns new args or None.
PreHook = Callable[[nn.Module, tuple[Any, ...]], Any]


class Handle(Protocol):
    """What attaching a hook returns: something that detaches it again."""

    def remove(self) -> None: ...


class MaskingMode(Protocol):
    """The interface between a layer and the way it applies sparsity."""

    #: ``"static"`` or ``"threshold"``: what ``step()`` produces.
    kind: str

    @property
    def mask(self) -> Mask | None:
        """The static mask (a tensor or a list per feature), or None."""

    @property
    def threshold(self) -> ThresholdResult | None:
        """The threshold that ``step()`` computed, or None."""

    @property
    def offset(self) -> torch.Tensor | None:
        """Per input feature, the mean of the values a compensating threshold zeroes
        (its contribution is added back to the layer's output), or None."""

    @property
    def ready(self) -> bool:
        """Whether ``squash_mask()`` can apply the mode (``step()`` has run, or a state
        was restored)."""

    def aggregate_hook(self, layer: Layer) -> PreHook:
        """The pre-hook that folds each input into ``layer.data`` while calibrating."""

    def sparsify(self, layer: Layer) -> Handle:
        """Attach what applies the sparsity to ``layer.module``; return its handle."""

    def compute(self, layer: Layer, data: Any) -> Any:
        """What ``step()`` will store, from ``data``; checked, and nothing is changed."""

    def store(self, computed: Any) -> None:
        """Keep what :meth:`compute` returned."""

    def restore(self, layer: Layer, state: LayerState) -> None:
        """Take a mask or threshold from a checked state record; raise
        ``SerializationError`` if it does not fit the layer."""


@attrs.frozen
class FeatureSpec:
    """The selected features of a layer, normalised: one index list per feature."""

    groups: tuple[tuple[int, ...], ...]
    dim: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.groups)

    @property
    def flat(self) -> tuple[int, ...]:
        return tuple(i for g in self.groups for i in g)


#: The largest index torch can hold (int64).
_MAX_INDEX = 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_features(layer: str, features: object, feature_dim: object) -> FeatureSpec | None:
    """Validate ``features`` / ``feature_dim`` and normalise them."""
    if features is None:
        if feature_dim is not None and not _is_int(feature_dim):
            raise ConfigError(f"layer {layer!r}: feature_dim must be an int, got {feature_dim!r}")
        return None
    if feature_dim is None:
        raise ConfigError(
            f"layer {layer!r}: features={features!r} needs feature_dim, the dimension "
            "along which the features are selected"
        )
    if not _is_int(feature_dim):
        raise ConfigError(f"layer {layer!r}: feature_dim must be an int, got {feature_dim!r}")
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence) or not features:
        raise ConfigError(
            f"layer {layer!r}: features must be a non-empty list of ints or lists of ints, "
            f"got {features!r}"
        )
    groups: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for position, feature in enumerate(features):
        indices = (feature,) if _is_int(feature) else feature
        if (
            isinstance(indices, (str, bytes))
            or not isinstance(indices, Sequence)
            or not indices
            or not all(_is_int(i) for i in indices)
        ):
            raise ConfigError(
                f"layer {layer!r}: features[{position}] must be an int or a non-empty list "
                f"of ints, got {feature!r}"
            )
        for index in indices:
            if index < 0:
                raise ConfigError(
                    f"layer {layer!r}: features[{position}] holds the negative index {index}"
                )
            if index > _MAX_INDEX:
                raise ConfigError(
                    f"layer {layer!r}: features[{position}] holds the index {index}, beyond "
                    f"the largest index a tensor can have ({_MAX_INDEX})"
                )
            if index in seen:
                raise ConfigError(
                    f"layer {layer!r}: feature index {index} is selected twice "
                    f"(again in features[{position}])"
                )
            seen.add(index)
        groups.append(tuple(indices))
    return FeatureSpec(tuple(groups), int(feature_dim))  # type: ignore[call-overload]


def resolve_config(
    registry: Registry, layer: str, config: Mapping[str, Any]
) -> tuple[AggregateStrategy, ReduceStrategy, MaskStrategy, FeatureSpec | None]:
    """Check a layer's full configuration and resolve its strategies."""
    resolved: list[Any] = []
    for key, kind in STRATEGY_KEYS.items():
        value = config[key]
        if value is None:
            raise ConfigError(
                f"layer {layer!r}: {key} is required; pass a callable or the name of a "
                f"registered {kind} strategy (known: {', '.join(registry.names(kind)) or 'none'})"
            )
        try:
            resolved.append(registry.resolve(kind, value, key=key))
        except (ConfigError, UnknownStrategyError) as exc:
            raise type(exc)(f"layer {layer!r}: {exc}") from None
    sparse_config = config[SPARSE_CONFIG_KEY]
    if not isinstance(sparse_config, Mapping):
        raise ConfigError(
            f"layer {layer!r}: sparse_config must be a mapping, got {sparse_config!r}"
        )
    mask_strategy: MaskStrategy = resolved[2]
    split_sparse_config(resolved[0], mask_strategy, sparse_config, layer=layer)
    spec = parse_features(layer, config[FEATURES_KEY], config[FEATURE_DIM_KEY])
    return resolved[0], resolved[1], mask_strategy, spec


def changed_options(left: Mapping[str, Any], right: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two sets of strategy options, sorted.

    A key present in one only differs; values of different types, or that
    cannot be compared, differ too.
    """

    def same(key: str) -> bool:
        if (key in left) != (key in right):
            return False
        try:
            return type(left[key]) is type(right[key]) and bool(left[key] == right[key])
        except Exception:
            return False

    return sorted(key for key in set(left) | set(right) if not same(key))


def no_graph(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut from autograd, so the accumulator never holds a graph.

    Only a tensor that requires grad is detached: calibration usually runs
    under ``torch.no_grad()``, where a detach would be one more operator on
    every call for nothing.
    """
    return x.detach() if x.requires_grad else x


@attrs.define(eq=False)
class Layer:
    """The runtime record of one registered layer.

    It owns the module, the resolved configuration and features, the
    accumulator and the attached hook. How the layer turns data into
    sparsity, and how it applies it, belongs to its :attr:`mode`, a
    :class:`MaskingMode`: a static mask or a threshold.
    """

    name: str
    module: nn.Module
    config: dict[str, Any]
    aggregate: AggregateStrategy
    reduce: ReduceStrategy
    mask_strategy: MaskStrategy
    features: FeatureSpec | None
    mode: MaskingMode
    hook_state: str = AGGREGATE
    handle: Any = None
    #: the accumulator: a tensor, or with features either one tensor holding every
    #: selected feature (fused aggregates) or a list with one per feature
    data: Any = None
    #: the shape of the first input seen since registration or step()
    input_shape: tuple[int, ...] | None = None
    #: the aggregate with its sparse_config options applied
    bound: BoundAggregate = attrs.field(init=False)
    #: the sparse_config keys that the mask strategy receives
    mask_options: dict[str, Any] = attrs.field(init=False)
    #: the sparse_config keys that the aggregate strategy receives (bound into ``bound``)
    aggregate_options: dict[str, Any] = attrs.field(init=False)
    # index tensors, built once and kept on the input's device
    _index: torch.Tensor | None = attrs.field(default=None, init=False)
    _indices: list[torch.Tensor] = attrs.field(factory=list, init=False)
    # the accumulator dimension that holds feature_dim (fused features only)
    _axis: int | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.aggregate_options, self.mask_options = split_sparse_config(
            self.aggregate, self.mask_strategy, self.config[SPARSE_CONFIG_KEY], layer=self.name
        )
        self.bound = self.aggregate.bind(self.aggregate_options)
        # Built here, once: a layer that cannot be built fails before it replaces another.
        self.build_indices()
        self.score_scale()  # a module the mask strategy cannot score fails registration

    # ----------------------------------------------------------------- config

    @property
    def dynamic(self) -> bool:
        """Whether the layer is in threshold mode (its mask strategy is ``dynamic``)."""
        return self.mask_strategy.dynamic

    @property
    def fused(self) -> bool:
        """Whether every selected feature is aggregated with one call."""
        aggregate = self.aggregate
        return self.features is not None and (
            aggregate.elementwise or aggregate.feature_axis is not None
        )

    @property
    def mask(self) -> Any:
        """The static mode's mask (None in threshold mode, or before the first input)."""
        return self.mode.mask

    @property
    def threshold(self) -> ThresholdResult | None:
        """The threshold mode's result of ``step()`` (None in static mode)."""
        return self.mode.threshold

    def take_sparse_config(self, built: Layer) -> bool:
        """Take the ``sparse_config`` of ``built``, a layer built from this one's
        configuration with other ``sparse_config`` values; keep the data and the mode.

        Returns whether the aggregate's options changed (then the aggregate hook,
        which holds the bound aggregate, must be attached again).
        """
        changed = bool(changed_options(self.aggregate_options, built.aggregate_options))
        self.config = built.config
        self.mask_options = built.mask_options
        if changed:
            self.aggregate_options = built.aggregate_options
            self.bound = built.bound
        return changed

    def set_option(self, key: str, value: Any) -> None:
        """Set one ``sparse_config`` key that the mask strategy receives."""
        self.config[SPARSE_CONFIG_KEY][key] = value
        self.mask_options = {**self.mask_options, key: value}

    def feature_axis(self, ndim: int) -> int:
        """Where ``feature_dim`` lies in a fused accumulator, for ``ndim``-dim inputs."""
        dim = self.features.dim if self.features is not None else 0
        axis = self.bound.feature_axis
        if axis is None:  # elementwise: the accumulator keeps the input's shape
            self._axis = dim
        else:
            try:
                self._axis = axis(dim % ndim, ndim)
            except ConfigError as exc:
                raise ConfigError(
                    f"layer {self.name!r}: aggregate strategy {self.aggregate.name!r} "
                    f"cannot keep features along feature_dim={dim}: {exc}"
                ) from None
        return self._axis

    def exposed_config(self) -> dict[str, Any]:
        return {key: copy.deepcopy(self.config[key]) for key in CONFIG_KEYS}

    # ------------------------------------------------------------------ data

    def exposed_data(self) -> Any:
        """The aggregated data as torch.ao shows it: a tensor, or a list per feature."""
        return self.split(self.data)

    def split(self, data: Any) -> Any:
        """``data`` (shaped like the accumulator) as a tensor, or a list per feature."""
        spec = self.features
        if data is None or spec is None or not self.fused or isinstance(data, list):
            return data
        axis = self._axis if self._axis is not None else spec.dim
        return list(torch.split(data, list(spec.sizes), dim=axis))

    def set_exposed_data(self, data: Any) -> None:
        """Restore data given in the exposed form (used by ``load_state_dict``)."""
        if data is None or self.features is None:
            self.data = data
            return
        if not isinstance(data, (list, tuple)) or len(data) != len(self.features.groups):
            raise ConfigError(
                f"layer {self.name!r}: data must be a list with one tensor per feature "
                f"({len(self.features.groups)}), got {type(data).__name__}"
            )
        if not self.aggregate.elementwise:
            # Unfused, or the accumulator axis is known only from the next input:
            # the aggregate hook concatenates the features when it sees one.
            self.data = list(data)
            return
        dim = self.features.dim
        for position, (part, size) in enumerate(zip(data, self.features.sizes, strict=True)):
            if not isinstance(part, torch.Tensor) or not -part.ndim <= dim < part.ndim:
                raise ConfigError(
                    f"layer {self.name!r}: data of features[{position}] must be a tensor "
                    f"with a dimension {dim}"
                )
            if part.shape[dim] != size:
                raise ConfigError(
                    f"layer {self.name!r}: data of features[{position}] has size "
                    f"{part.shape[dim]} along feature_dim {dim}, expected {size}"
                )
        self.data = torch.cat(list(data), dim=dim)

    # -------------------------------------------------------- feature indices

    def index_on(self, device: torch.device) -> torch.Tensor:
        """Every selected index along ``feature_dim``, as one tensor on ``device``."""
        index = self._index
        if index is None:
            index = self.build_indices()
        if index.device != device:
            index = self._index = index.to(device)
            self._indices = [t.to(device) for t in self._indices]
        return index

    def indices_on(self, device: torch.device) -> list[torch.Tensor]:
        """One index tensor per feature, on ``device``."""
        self.index_on(device)
        return self._indices

    def build_indices(self) -> torch.Tensor:
        """Build the index tensors (once, when a hook is made: never per call)."""
        groups = self.features.groups if self.features is not None else ()
        self._indices = [torch.tensor(g, dtype=torch.long) for g in groups]
        self._index = torch.cat(self._indices) if groups else torch.empty(0, dtype=torch.long)
        return self._index

    def check_input(self, x: torch.Tensor) -> None:
        """Check the first input after registration or step() against the features."""
        if self.features is None:
            return
        dim = self.features.dim
        if not -x.ndim <= dim < x.ndim:
            raise ConfigError(
                f"layer {self.name!r}: feature_dim={dim} is out of range for an input "
                f"with {x.ndim} dimensions"
            )
        size = x.shape[dim]
        too_big = [i for i in self.features.flat if i >= size]
        if too_big:
            raise ConfigError(
                f"layer {self.name!r}: feature index {too_big[0]} is out of range for "
                f"dimension {dim} of size {size}"
            )

    def slice_shapes(self) -> list[tuple[int, ...]] | None:
        """The shape of each selected slice of the first input, if one was seen."""
        if self.input_shape is None or self.features is None:
            return None
        shape = list(self.input_shape)
        out = []
        for k in self.features.sizes:
            shape[self.features.dim] = k
            out.append(tuple(shape))
        return out

    # ------------------------------------------------------------- strategies

    def bad_input(self, args: tuple[Any, ...]) -> Any:
        """Raise the error for a call whose first positional argument is not a tensor."""
        if not args:
            raise ConfigError(
                f"layer {self.name!r} was called without a positional input (as "
                "layer(input=x)?); actsparse's hooks see positional arguments only, so call "
                "it as layer(x)"
            )
        if isinstance(args[0], torch.Tensor):
            raise ConfigError(
                f"layer {self.name!r}: its kernel computes layer(x) and takes no other "
                f"argument, got {len(args)} positional argument(s) and keywords"
            )
        raise ConfigError(
            f"layer {self.name!r}: its first positional input is a {type(args[0]).__name__}, "
            "not a tensor; actsparse sparsifies the tensor that a layer receives first"
        )

    def strategy_failed(self, exc: Exception) -> ActsparseError:
        """The error that a forward pass raises when the aggregate strategy fails.

        An actsparse error passes through as it is; anything else becomes a
        :class:`StrategyError` naming the layer and the strategy.
        """
        if isinstance(exc, ActsparseError):
            return exc
        return StrategyError(
            f"layer {self.name!r}: aggregate strategy {self.aggregate.name!r} raised during "
            f"the forward pass: {exc!r}; the layer's aggregated data and mask are unchanged"
        )

    def reduce_data(self, data: Any, where: str, what: str) -> Any:
        """``data`` finalized and reduced; a failure is a MaskError naming ``where``."""
        try:
            finalize = self.bound.finalize
            if finalize is not None:
                data = finalize(data)
            return self.reduce.fn(data)
        except Exception as exc:
            raise self._mask_failed(where, what, exc) from exc

    def call_mask_strategy(
        self, reduced: Any, options: Mapping[str, Any], where: str, what: str
    ) -> Any:
        """``mask_strategy.fn(reduced, **options)``; a failure is a MaskError naming ``where``."""
        try:
            return self.mask_strategy.fn(reduced, **options)
        except Exception as exc:
            raise self._mask_failed(where, what, exc) from exc

    def _mask_failed(self, where: str, what: str, exc: Exception) -> MaskError:
        return MaskError(
            f"{where}: computing the {what} with reduce {self.reduce.name!r} and mask "
            f"{self.mask_strategy.name!r} failed: {exc!r}"
        )

    def score_scale(self) -> torch.Tensor | None:
        """The mask strategy's per-feature scale of the score ``|x| * scale``, or None.

        Read from the module (``MaskStrategy.scale``) and checked; it is
        called when a hook is attached, never per forward call.
        """
        fn = self.mask_strategy.scale
        if fn is None:
            return None
        where = f"layer {self.name!r}: mask strategy {self.mask_strategy.name!r}"
        try:
            with torch.no_grad():
                scale = fn(self.module)
        except ConfigError as exc:
            raise ConfigError(
                f"{where} cannot score this {type(self.module).__name__}: {exc}"
            ) from None
        except Exception as exc:
            raise MaskError(f"{where}: its scale raised {exc!r}") from exc
        if (
            not isinstance(scale, torch.Tensor)
            or scale.ndim != 1
            or not scale.is_floating_point()
            or scale.numel() == 0
        ):
            raise MaskError(
                f"{where}: its scale must be a non-empty 1-D floating tensor (one number per "
                f"input feature), got "
                + (
                    f"a {scale.dtype} tensor of shape {tuple(scale.shape)}"
                    if isinstance(scale, torch.Tensor)
                    else type(scale).__name__
                )
            )
        scale = scale.detach()
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise MaskError(f"{where}: its scale holds negative or non-finite numbers")
        return scale

    # ----------------------------------------------------------------- hooks

    def attach(self, state: str) -> None:
        """Attach the hook that ``state`` names (replacing any attached one)."""
        self.detach()
        if state == AGGREGATE:
            self.handle = self.module.register_forward_pre_hook(self.mode.aggregate_hook(self))
        elif state == SPARSIFY:
            self.handle = self.mode.sparsify(self)
        self.hook_state = state

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    # ------------------------------------------------------------------ step

    @property
    def combine(self) -> Any:
        """How the accumulator combines across processes (options applied), or None."""
        return self.bound.combine

    def compute(self, data: Any = None) -> Any:
        """What step() stores for this layer, validated; nothing is changed here.

        ``data`` replaces the layer's own accumulator (step() passes the one
        combined across processes); it has the same structure.
        """
        return self.mode.compute(self, self.data if data is None else data)

    def store(self, computed: Any) -> None:
        """Keep what :meth:`compute` returned and clear the aggregated data."""
        self.mode.store(computed)
        self.data = None

    # ------------------------------------------------------------ state dicts

    def to_state(self) -> LayerState:
        """This layer as a state-dict record: copies, never the live tensors."""
        mask = self.mode.mask
        if isinstance(mask, list):
            mask = [m.clone() for m in mask]
        elif mask is not None:
            mask = mask.clone()
        data = self.exposed_data()
        if isinstance(data, list):
            data = [d.clone() if isinstance(d, torch.Tensor) else copy.deepcopy(d) for d in data]
        elif isinstance(data, torch.Tensor):
            data = data.clone()
        else:
            data = copy.deepcopy(data)
        return LayerState(
            config=self.exposed_config(),
            hook_state=self.hook_state,
            mask=mask,
            threshold=self.mode.threshold,
            data=data,
            offset=None if self.mode.offset is None else self.mode.offset.clone(),
        )

    def restore(self, state: LayerState) -> None:
        """Take a checked state-dict record of this layer; attaches nothing.

        Raises:
            SerializationError: The record does not fit the layer.
        """
        self.hook_state = state.hook_state
        try:
            self.set_exposed_data(copy.deepcopy(state.data))
        except (ConfigError, RuntimeError, IndexError, TypeError, ValueError) as exc:
            raise SerializationError(
                f"the data of layer {self.name!r} cannot be restored: {exc}"
            ) from exc
        self.mode.restore(self, state)


def check_mask(
    mask: object,
    *,
    where: str,
    strategy: str,
    target: tuple[int, ...] | None,
    origin: str | None = None,
) -> None:
    """Raise MaskError unless ``mask`` is a dense {0, 1} tensor that broadcasts to ``target``.

    ``origin`` says where the mask came from in messages; by default the mask
    strategy ``strategy`` returned it.
    """
    source = origin or f"mask strategy {strategy!r} returned"
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"{where}: {source} {type(mask).__name__}, not a tensor")
    if mask.layout != torch.strided:
        raise MaskError(f"{where}: {source} a {mask.layout} tensor; masks must be dense")
    if mask.is_meta:
        raise MaskError(
            f"{where}: {source} a tensor on the meta device, which holds no values; "
            "calibrate on a device with data"
        )
    if mask.is_nested or mask.is_quantized:
        kind = "nested" if mask.is_nested else f"quantized ({mask.dtype})"
        raise MaskError(f"{where}: {source} a {kind} tensor; masks must be plain dense tensors")
    if mask.is_complex():
        raise MaskError(
            f"{where}: {source} a {mask.dtype} tensor; masks must be real floating, "
            "integer or bool tensors"
        )
    if mask.dtype != torch.bool:
        binary = bool(torch.logical_or(mask == 0, mask == 1).all())
        if not binary:
            nan = mask.is_floating_point() and bool(mask.isnan().any())
            raise MaskError(
                f"{where}: {source} "
                + ("NaN" if nan else "values other than 0 and 1")
                + "; a mask holds only zeros and ones"
            )
    if target is not None:
        try:
            shape = torch.broadcast_shapes(mask.shape, target)  # type: ignore[no-untyped-call]
            ok = tuple(shape) == tuple(target)
        except RuntimeError:
            ok = False
        if not ok:
            raise MaskError(
                f"{where}: {source} a mask of shape {tuple(mask.shape)}, which does not "
                f"broadcast to the input's {tuple(target)}"
            )
