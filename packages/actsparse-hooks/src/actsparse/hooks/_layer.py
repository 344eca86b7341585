"""One registered layer: its configuration, resolved strategies, hooks and state.

The hook functions built here run on every forward pass. They hold no Python
loop over features (an elementwise aggregate folds every selected feature with
one call), build no tensors after the first call, and never read a tensor's
values back to the host.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from actsparse.core import (
    CONFIG_KEYS,
    AggregateStrategy,
    BoundAggregate,
    ConfigError,
    MaskError,
    MaskStrategy,
    ReduceStrategy,
    Registry,
    StrategyError,
    UnknownStrategyError,
    split_sparse_config,
)

if TYPE_CHECKING:
    from actsparse.hooks._dynamic import ThresholdResult, ValidPositions

AGGREGATE = "aggregate"
SPARSIFY = "sparsify"
DETACHED = "None"

_STRATEGY_KINDS = (("aggregate_fn", "aggregate"), ("reduce_fn", "reduce"), ("mask_fn", "mask"))


def _ones_placeholder(x: torch.Tensor) -> torch.Tensor:
    # torch.ao keeps ones_like(input) as the mask until step(); a stride-0 view
    # gives the same values and shape without memory that grows with the batch.
    return torch.ones((), dtype=x.dtype, device=x.device).expand(x.shape)


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
    for key, kind in _STRATEGY_KINDS:
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
    sparse_config = config["sparse_config"]
    if not isinstance(sparse_config, Mapping):
        raise ConfigError(
            f"layer {layer!r}: sparse_config must be a mapping, got {sparse_config!r}"
        )
    mask_strategy: MaskStrategy = resolved[2]
    split_sparse_config(resolved[0], mask_strategy, sparse_config, layer=layer)
    spec = parse_features(layer, config["features"], config["feature_dim"])
    return resolved[0], resolved[1], mask_strategy, spec


def no_graph(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut from autograd, so the accumulator never holds a graph.

    Only a tensor that requires grad is detached: calibration usually runs
    under ``torch.no_grad()``, where a detach would be one more operator on
    every call for nothing.
    """
    return x.detach() if x.requires_grad else x


@attrs.define(eq=False)
class Layer:
    """The runtime record of one registered layer."""

    name: str
    module: nn.Module
    config: dict[str, Any]
    aggregate: AggregateStrategy
    reduce: ReduceStrategy
    mask_strategy: MaskStrategy
    features: FeatureSpec | None
    hook_state: str = AGGREGATE
    handle: RemovableHandle | None = None
    #: the accumulator: a tensor, or with features either one tensor holding every
    #: selected feature (elementwise aggregates) or a list with one per feature
    data: Any = None
    mask: Any = None
    #: the shape of the first input seen (or of each selected slice)
    input_shape: tuple[int, ...] | None = None
    # index tensors, built once and kept on the input's device
    _index: torch.Tensor | None = None
    _indices: list[torch.Tensor] | None = None
    # the mask as the sparsify hook applies it (cast, and for features combined)
    _applied: torch.Tensor | None = None
    # the accumulator dimension that holds feature_dim (fused features only)
    _axis: int | None = None
    #: threshold mode (a ``dynamic`` mask strategy): the result of step()
    threshold: ThresholdResult | None = None
    #: threshold mode: the sparsifier's valid-position mask holder
    valid: ValidPositions | None = None
    # threshold mode: the reduced statistic of the last step(), for retargeting
    _reduced: Any = None
    # the aggregate with its sparse_config options applied, and the mask's options
    _bound: BoundAggregate = attrs.field(init=False)
    _mask_options: dict[str, Any] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        options, self._mask_options = split_sparse_config(
            self.aggregate, self.mask_strategy, self.config["sparse_config"], layer=self.name
        )
        self._bound = self.aggregate.bind(options)

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

    def _feature_axis(self, ndim: int) -> int:
        """Where ``feature_dim`` lies in a fused accumulator, for ``ndim``-dim inputs."""
        dim = self.features.dim if self.features is not None else 0
        axis = self._bound.feature_axis
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
        return self._split(self.data)

    def _split(self, data: Any) -> Any:
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

    # ----------------------------------------------------------------- hooks

    def _index_on(self, device: torch.device) -> torch.Tensor:
        index = self._index
        if index is None:
            index = self._build_indices()
        if index.device != device:
            index = self._index = index.to(device)
            self._indices = [t.to(device) for t in self._indices or ()]
        return index

    def _build_indices(self) -> torch.Tensor:
        groups = self.features.groups if self.features is not None else ()
        self._indices = [torch.tensor(g, dtype=torch.long) for g in groups]
        self._index = torch.cat(self._indices) if groups else torch.empty(0, dtype=torch.long)
        return self._index

    def _check_input(self, x: torch.Tensor) -> None:
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

    def _first_input(self, x: torch.Tensor) -> None:
        """Bookkeeping on the first input, once it is checked and aggregated."""
        self.input_shape = tuple(x.shape)
        if self.mask is not None:
            return
        # Never keep an inference tensor as the mask: autograd could not save it
        # when the model later runs with gradients.
        with torch.inference_mode(False):
            if self.features is None:
                self.mask = _ones_placeholder(x)
                return
            shape = list(x.shape)
            masks = []
            for k in self.features.sizes:
                shape[self.features.dim] = k
                masks.append(torch.ones((), dtype=x.dtype, device=x.device).expand(shape))
            self.mask = masks

    def _strategy_failed(self, exc: Exception) -> StrategyError:
        return StrategyError(
            f"layer {self.name!r}: aggregate strategy {self.aggregate.name!r} raised during "
            f"the forward pass: {exc!r}; the layer's aggregated data and mask are unchanged"
        )

    def _check_elementwise(self, new: Any, selected: torch.Tensor) -> None:
        shape = getattr(new, "shape", None)
        if shape is None or tuple(shape) != tuple(selected.shape):
            got = "no tensor" if shape is None else f"shape {tuple(shape)}"
            raise ConfigError(
                f"layer {self.name!r}: aggregate strategy {self.aggregate.name!r} is marked "
                f"elementwise but returned {got} for the selected features of shape "
                f"{tuple(selected.shape)}; an aggregate that changes the shape must be "
                "registered with elementwise=False"
            )

    def aggregate_hook(self) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        fn = self._bound.fn
        init = self._bound.init or torch.zeros_like
        spec = self.features
        if spec is None:

            def aggregate_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = no_graph(args[0])
                acc = self.data
                # Compute first, then commit: a raising strategy changes nothing.
                try:
                    new = fn(init(x) if acc is None else acc, x)
                except Exception as exc:
                    raise self._strategy_failed(exc) from exc
                if acc is None:
                    self._first_input(x)
                self.data = new

            return aggregate_hook

        self._build_indices()
        dim = spec.dim
        if self.fused:

            def aggregate_features_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = no_graph(args[0])
                acc = self.data
                if acc is None:
                    self._check_input(x)
                index = self._index_on(x.device)
                selected = x.index_select(dim, index)
                if acc is None:
                    self._feature_axis(x.ndim)
                elif isinstance(acc, list):  # restored per feature by load_state_dict
                    acc = torch.cat(acc, dim=self._feature_axis(x.ndim))
                try:
                    new = fn(init(selected) if acc is None else acc, selected)
                except Exception as exc:
                    raise self._strategy_failed(exc) from exc
                if acc is None:
                    if self.aggregate.elementwise:
                        self._check_elementwise(new, selected)
                    self._first_input(x)
                self.data = new

            return aggregate_features_hook

        def aggregate_each_feature_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            # A callable that is not known to be elementwise gets one call per
            # feature, as torch.ao does; registered elementwise strategies avoid this.
            x = no_graph(args[0])
            acc = self.data
            if acc is None:
                self._check_input(x)
            self._index_on(x.device)
            slices = [x.index_select(dim, index) for index in self._indices or ()]
            try:
                if acc is None:
                    new = [fn(init(s), s) for s in slices]
                else:
                    new = [fn(a, s) for a, s in zip(acc, slices, strict=True)]
            except Exception as exc:
                raise self._strategy_failed(exc) from exc
            if acc is None:
                self._first_input(x)
            self.data = new

        return aggregate_each_feature_hook

    def sparsify_hook(self) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        self._applied = None
        if self.features is None:

            def sparsify_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0]
                mask = self._applied
                if mask is None or mask.device != x.device or mask.dtype != x.dtype:
                    mask = self._applied = self._mask_for(x)
                return (x * mask, *args[1:])

            return sparsify_hook

        self._build_indices()
        dim = self.features.dim

        def sparsify_features_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            full = self._applied
            if (
                full is None
                or full.device != x.device
                or full.dtype != x.dtype
                or full.ndim != x.ndim
                or full.shape[dim] != x.shape[dim]
            ):
                full = self._applied = self._mask_for(x)
            return (x * full, *args[1:])

        return sparsify_features_hook

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask as the sparsify hook applies it to ``x``; built when the cache misses.

        It is never an inference tensor (autograd may have to save it later):
        stored masks never are, and new ones are built outside inference mode.
        It must broadcast to ``x`` without growing it.
        """
        mask: torch.Tensor
        with torch.inference_mode(False):
            if self.features is None:
                mask = self.mask.to(device=x.device, dtype=x.dtype)
            else:
                mask = self._full_mask(x)
        try:
            shape: tuple[int, ...] | None = tuple(
                torch.broadcast_shapes(mask.shape, x.shape)  # type: ignore[no-untyped-call]
            )
        except RuntimeError:
            shape = None
        if shape != tuple(x.shape):
            raise MaskError(
                f"layer {self.name!r}: its mask of shape {tuple(mask.shape)} does not "
                f"broadcast to the input of shape {tuple(x.shape)}; load masks only into "
                "a model of the same architecture and feed inputs of the calibrated shape"
            )
        return mask

    def _full_mask(self, x: torch.Tensor) -> torch.Tensor:
        """One mask over all of dim ``feature_dim``: the features' masks, ones elsewhere."""
        spec = self.features
        if spec is None:
            return self.mask  # type: ignore[no-any-return]
        ndim = x.ndim
        dim = spec.dim % ndim
        parts = []
        for position, (mask, size) in enumerate(zip(self.mask, spec.sizes, strict=True)):
            mask = mask.to(device=x.device, dtype=x.dtype)
            if mask.ndim > ndim:
                raise MaskError(
                    f"layer {self.name!r}: the mask of features[{position}] has "
                    f"{mask.ndim} dimensions, the input only {ndim}"
                )
            mask = mask.reshape((1,) * (ndim - mask.ndim) + tuple(mask.shape))
            if mask.shape[dim] not in (1, size):
                raise MaskError(
                    f"layer {self.name!r}: the mask of features[{position}] has size "
                    f"{mask.shape[dim]} along feature_dim, expected 1 or {size}"
                )
            parts.append(mask)
        try:
            common = list(
                torch.broadcast_shapes(  # type: ignore[no-untyped-call]
                    *((*p.shape[:dim], 1, *p.shape[dim + 1 :]) for p in parts)
                )
            )
        except RuntimeError as exc:
            raise MaskError(
                f"layer {self.name!r}: the features' masks do not broadcast: {exc}"
            ) from exc
        expanded = []
        for part, size in zip(parts, spec.sizes, strict=True):
            common[dim] = size
            expanded.append(part.expand(common))
        common[dim] = x.shape[dim]
        full = torch.ones(common, dtype=x.dtype, device=x.device)
        full.index_copy_(dim, self._index_on(x.device), torch.cat(expanded, dim=dim))
        return full

    def attach(self, state: str) -> None:
        """Attach the hook that ``state`` names (replacing any attached one)."""
        self.detach()
        if self.dynamic:
            from actsparse.hooks import _dynamic

            if state == AGGREGATE:
                self.handle = self.module.register_forward_pre_hook(_dynamic.aggregate_hook(self))
            elif state == SPARSIFY:
                self.handle = self.module.register_forward_pre_hook(_dynamic.sparsify_hook(self))
        elif state == AGGREGATE:
            self.handle = self.module.register_forward_pre_hook(self.aggregate_hook())
        elif state == SPARSIFY:
            self.handle = self.module.register_forward_pre_hook(self.sparsify_hook())
        self.hook_state = state

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    # ------------------------------------------------------------------ step

    @property
    def combine(self) -> Any:
        """How the accumulator combines across processes (options applied), or None."""
        return self._bound.combine

    def compute_mask(self, data: Any = None) -> Any:
        """The mask (or threshold) that step() stores, validated; nothing is changed here.

        ``data`` replaces the layer's own accumulator (step() passes the one
        combined across processes); it has the same structure.
        """
        if data is None:
            data = self.data
        if self.dynamic:
            from actsparse.hooks._dynamic import compute_threshold

            return compute_threshold(self, data)
        if self.features is None:
            return self._mask_from(data, self.input_shape, None)
        per_feature = self._split(data)
        shapes = self._slice_shapes()
        return [
            self._mask_from(d, shapes[i] if shapes else None, i) for i, d in enumerate(per_feature)
        ]

    def store(self, computed: Any) -> None:
        """Keep what :meth:`compute_mask` returned and clear the aggregated data."""
        if self.dynamic:
            self.threshold = computed.result
            self._reduced = computed.reduced
        else:
            self.mask = computed
        self.data = None

    def _slice_shapes(self) -> list[tuple[int, ...]] | None:
        if self.input_shape is None or self.features is None:
            return None
        shape = list(self.input_shape)
        out = []
        for k in self.features.sizes:
            shape[self.features.dim] = k
            out.append(tuple(shape))
        return out

    def reduce_data(self, data: Any, where: str, what: str) -> Any:
        """``data`` finalized and reduced; a failure is a MaskError naming ``where``."""
        try:
            finalize = self._bound.finalize
            if finalize is not None:
                data = finalize(data)
            return self.reduce.fn(data)
        except Exception as exc:
            raise MaskError(
                f"{where}: computing the {what} with reduce {self.reduce.name!r} and mask "
                f"{self.mask_strategy.name!r} failed: {exc!r}"
            ) from exc

    def _mask_from(
        self, data: Any, target: tuple[int, ...] | None, feature: int | None
    ) -> torch.Tensor:
        where = f"layer {self.name!r}" + ("" if feature is None else f", features[{feature}]")
        reduced = self.reduce_data(data, where, "mask")
        self._check_finite(reduced, where)
        try:
            mask = self.mask_strategy.fn(reduced, **self._mask_options)
        except Exception as exc:
            raise MaskError(
                f"{where}: computing the mask with reduce {self.reduce.name!r} and mask "
                f"{self.mask_strategy.name!r} failed: {exc!r}"
            ) from exc
        check_mask(mask, where=where, strategy=self.mask_strategy.name, target=target)
        checked = cast(torch.Tensor, mask)
        if checked.is_inference():  # computed in inference mode: autograd may need it later
            with torch.inference_mode(False):
                checked = checked.clone()
        return checked

    def _check_finite(self, reduced: object, where: str) -> None:
        """Refuse to compute a mask from NaN or Inf: its choice would be arbitrary."""
        if (
            not isinstance(reduced, torch.Tensor)
            or not (reduced.is_floating_point() or reduced.is_complex())
            or reduced.is_meta
            or reduced.layout != torch.strided
        ):
            return
        finite = torch.isfinite(reduced)
        if not bool(finite.all()):
            bad = int(finite.numel() - int(finite.sum()))
            raise MaskError(
                f"{where}: the data that reduce {self.reduce.name!r} returned holds {bad} NaN "
                f"or Inf value(s) of {finite.numel()}; the calibration inputs (or an fp16 "
                "accumulator that overflowed) were not finite. No mask was stored: register "
                "the layer again to restart its aggregation"
            )


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
    if mask.is_complex():
        raise MaskError(f"{where}: {source} a {mask.dtype} tensor; masks must be real")
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
