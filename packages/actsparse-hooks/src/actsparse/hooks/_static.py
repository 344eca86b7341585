"""The static masking mode: ``step()`` computes a {0, 1} mask, the input is multiplied by it.

This is torch.ao's behaviour. The hooks built here run on every forward
pass: they hold no Python loop over features (a fused aggregate folds every
selected feature with one call), build no tensors after the first call, and
never read a tensor's values back to the host.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from actsparse.core import (
    SPARSIFY,
    ConfigError,
    LayerState,
    Mask,
    MaskError,
    SerializationError,
    ThresholdResult,
)
from actsparse.hooks._layer import Handle, Layer, PreHook, check_mask, no_graph

__all__ = ["StaticMask"]


def _ones_placeholder(x: torch.Tensor, shape: list[int] | torch.Size) -> torch.Tensor:
    # torch.ao keeps ones_like(input) as the mask until step(); a stride-0 view
    # gives the same values and shape without memory that grows with the batch.
    return torch.ones((), dtype=x.dtype, device=x.device).expand(shape)


def _not_inference(mask: Any) -> Any:
    """``mask`` with inference tensors cloned (autograd may have to save it later)."""
    with torch.inference_mode(False):
        if isinstance(mask, list):
            return [_not_inference(m) for m in mask]
        if isinstance(mask, torch.Tensor) and mask.is_inference():
            return mask.clone()
        return mask


class StaticMask:
    """A layer's mask: computed by ``step()``, multiplied into every input after squash."""

    kind = "static"

    def __init__(self) -> None:
        self._mask: Mask | None = None
        # the mask as the sparsify hook applies it (cast, and for features combined)
        self._applied: torch.Tensor | None = None
        # the last input shape the applied mask was checked against
        self._checked: torch.Size | None = None
        # whether the mask is the ones placeholder of the first input (no step() yet)
        self._placeholder = False

    @property
    def mask(self) -> Mask | None:
        return self._mask

    @property
    def threshold(self) -> ThresholdResult | None:
        return None

    @property
    def offset(self) -> torch.Tensor | None:
        return None

    @property
    def ready(self) -> bool:
        return self._mask is not None

    @property
    def placeholder(self) -> bool:
        """Whether the mask is torch.ao's placeholder of ones: inputs were seen, no step()."""
        return self._placeholder

    @property
    def applied_ndim(self) -> int | None:
        """The rank of the inputs the sparsify hook has seen, if it ran."""
        return None if self._applied is None else self._applied.ndim

    # ------------------------------------------------------------ aggregation

    def _first_input(self, layer: Layer, x: torch.Tensor) -> None:
        """Bookkeeping on the first input, once it is checked and aggregated."""
        layer.input_shape = tuple(x.shape)
        if self._mask is not None:
            return
        # Never keep an inference tensor as the mask: autograd could not save it
        # when the model later runs with gradients.
        self._placeholder = True
        with torch.inference_mode(False):
            if layer.features is None:
                self._mask = _ones_placeholder(x, x.shape)
                return
            shape = list(x.shape)
            masks = []
            for k in layer.features.sizes:
                shape[layer.features.dim] = k
                masks.append(_ones_placeholder(x, shape))
            self._mask = masks

    def aggregate_hook(self, layer: Layer) -> PreHook:
        fn = layer.bound.fn
        init = layer.bound.init or torch.zeros_like
        spec = layer.features
        if spec is None:

            def aggregate_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = no_graph(
                    args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
                )
                acc = layer.data
                # Compute first, then commit: a raising strategy changes nothing.
                try:
                    new = fn(init(x) if acc is None else acc, x)
                except Exception as exc:
                    raise layer.strategy_failed(exc) from exc
                if acc is None:
                    self._first_input(layer, x)
                layer.data = new

            return aggregate_hook

        dim = spec.dim
        if layer.fused:
            elementwise = layer.aggregate.elementwise

            def aggregate_features_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = no_graph(
                    args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
                )
                acc = layer.data
                if acc is None:
                    layer.check_input(x)
                selected = x.index_select(dim, layer.index_on(x.device))
                if acc is None:
                    layer.feature_axis(x.ndim)
                elif isinstance(acc, list):  # restored per feature by load_state_dict
                    acc = torch.cat(acc, dim=layer.feature_axis(x.ndim))
                try:
                    new = fn(init(selected) if acc is None else acc, selected)
                except Exception as exc:
                    raise layer.strategy_failed(exc) from exc
                if acc is None:
                    if elementwise:
                        _check_elementwise(layer, new, selected)
                    self._first_input(layer, x)
                layer.data = new

            return aggregate_features_hook

        def aggregate_each_feature_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            # A callable that is not known to be elementwise gets one call per
            # feature, as torch.ao does; registered elementwise strategies avoid this.
            x = no_graph(
                args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
            )
            acc = layer.data
            if acc is None:
                layer.check_input(x)
            slices = [x.index_select(dim, index) for index in layer.indices_on(x.device)]
            try:
                if acc is None:
                    new = [fn(init(s), s) for s in slices]
                else:
                    new = [fn(a, s) for a, s in zip(acc, slices, strict=True)]
            except Exception as exc:
                raise layer.strategy_failed(exc) from exc
            if acc is None:
                self._first_input(layer, x)
            layer.data = new

        return aggregate_each_feature_hook

    # ----------------------------------------------------------- application

    def sparsify(self, layer: Layer) -> Handle:
        self._applied = None
        self._checked = None
        if layer.features is None:

            def sparsify_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
                mask = self._applied
                if mask is None or mask.device != x.device or mask.dtype != x.dtype:
                    mask = self._applied = self._mask_for(layer, x)
                    self._checked = x.shape
                elif self._checked != x.shape:
                    # a cached mask is checked again against every new input shape
                    self._check_fits(layer, mask, x)
                    self._checked = x.shape
                return (x * mask, *args[1:])

            return layer.module.register_forward_pre_hook(sparsify_hook)

        dim = layer.features.dim

        def sparsify_features_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else layer.bad_input(args)
            full = self._applied
            if (
                full is None
                or full.device != x.device
                or full.dtype != x.dtype
                or full.ndim != x.ndim
                or full.shape[dim] != x.shape[dim]
            ):
                full = self._applied = self._mask_for(layer, x)
                self._checked = x.shape
            elif self._checked != x.shape:
                self._check_fits(layer, full, x)
                self._checked = x.shape
            return (x * full, *args[1:])

        return layer.module.register_forward_pre_hook(sparsify_features_hook)

    def _check_fits(self, layer: Layer, mask: torch.Tensor, x: torch.Tensor) -> None:
        try:
            shape: tuple[int, ...] | None = tuple(
                torch.broadcast_shapes(mask.shape, x.shape)  # type: ignore[no-untyped-call]
            )
        except RuntimeError:
            shape = None
        if shape != tuple(x.shape):
            raise MaskError(
                f"layer {layer.name!r}: its mask of shape {tuple(mask.shape)} does not "
                f"broadcast to the input of shape {tuple(x.shape)} without changing its "
                "shape; load masks only into a model of the same architecture and feed "
                "inputs of the calibrated shape (or compute the mask with step() before "
                "squash_mask())"
            )

    def _mask_for(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """The mask as the sparsify hook applies it to ``x``; built when the cache misses.

        It is never an inference tensor (autograd may have to save it later):
        stored masks never are, and new ones are built outside inference mode.
        It must broadcast to ``x`` without growing it.
        """
        mask: torch.Tensor
        with torch.inference_mode(False):
            if layer.features is None:
                mask = cast(torch.Tensor, self._mask).to(device=x.device, dtype=x.dtype)
            else:
                mask = self._full_mask(layer, x)
        self._check_fits(layer, mask, x)
        return mask

    def _full_mask(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """One mask over all of dim ``feature_dim``: the features' masks, ones elsewhere."""
        spec = layer.features
        if spec is None:  # pragma: no cover - only called with features
            raise MaskError(f"layer {layer.name!r} has no features")
        ndim = x.ndim
        dim = spec.dim % ndim
        parts = []
        masks = cast(list[torch.Tensor], self._mask)
        for position, (mask, size) in enumerate(zip(masks, spec.sizes, strict=True)):
            mask = mask.to(device=x.device, dtype=x.dtype)
            if mask.ndim > ndim:
                raise MaskError(
                    f"layer {layer.name!r}: the mask of features[{position}] has "
                    f"{mask.ndim} dimensions, the input only {ndim}"
                )
            mask = mask.reshape((1,) * (ndim - mask.ndim) + tuple(mask.shape))
            if mask.shape[dim] not in (1, size):
                raise MaskError(
                    f"layer {layer.name!r}: the mask of features[{position}] has size "
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
                f"layer {layer.name!r}: the features' masks do not broadcast: {exc}"
            ) from exc
        expanded = []
        for part, size in zip(parts, spec.sizes, strict=True):
            common[dim] = size
            expanded.append(part.expand(common))
        common[dim] = x.shape[dim]
        full = torch.ones(common, dtype=x.dtype, device=x.device)
        full.index_copy_(dim, layer.index_on(x.device), torch.cat(expanded, dim=dim))
        return full

    # ------------------------------------------------------------------ step

    def compute(self, layer: Layer, data: Any) -> Any:
        if layer.features is None:
            return self._mask_from(layer, data, layer.input_shape, None)
        per_feature = layer.split(data)
        shapes = layer.slice_shapes()
        return [
            self._mask_from(layer, d, shapes[i] if shapes else None, i)
            for i, d in enumerate(per_feature)
        ]

    def store(self, computed: Any) -> None:
        self._mask = computed
        self._applied = None
        self._placeholder = False

    def _mask_from(
        self, layer: Layer, data: Any, target: tuple[int, ...] | None, feature: int | None
    ) -> torch.Tensor:
        where = f"layer {layer.name!r}" + ("" if feature is None else f", features[{feature}]")
        reduced = layer.reduce_data(data, where, "mask")
        _check_finite(layer, reduced, where)
        mask = layer.call_mask_strategy(reduced, layer.mask_options, where, "mask")
        check_mask(mask, where=where, strategy=layer.mask_strategy.name, target=target)
        checked = cast(torch.Tensor, mask)
        if checked.is_inference():  # computed in inference mode: autograd may need it later
            with torch.inference_mode(False):
                checked = checked.clone()
        return checked

    # ------------------------------------------------------------ state dicts

    def restore(self, layer: Layer, state: LayerState) -> None:
        if state.threshold is not None:
            raise SerializationError(
                f"the state of layer {layer.name!r} holds a threshold but its mask strategy "
                f"{layer.mask_strategy.name!r} is not dynamic"
            )
        if state.hook_state == SPARSIFY and state.mask is None:
            raise SerializationError(
                f"layer {layer.name!r} is squashed but its state holds no mask"
            )
        self._check_restored(layer, state.mask)
        self._mask = _not_inference(state.mask)
        self._applied = None
        self._placeholder = False

    @staticmethod
    def _check_restored(layer: Layer, mask: Mask | None) -> None:
        """Refuse masks that are not dense {0, 1} tensors, or that do not fit the data.

        The data of an elementwise aggregate has the input's shape, so a mask
        must broadcast to it; without data the shape is checked on the first
        forward pass.
        """
        if mask is None:
            return
        masks = mask if isinstance(mask, list) else [mask]
        data = layer.exposed_data()
        shaped = data is not None and layer.aggregate.elementwise and layer.aggregate.init is None
        datas = data if isinstance(data, list) else [data]
        for position, m in enumerate(masks):
            where = f"layer {layer.name!r}" + (
                "" if layer.features is None else f", features[{position}]"
            )
            target = None
            if shaped and isinstance(datas[position], torch.Tensor):
                target = tuple(datas[position].shape)
            check_mask(
                m,
                where=where,
                strategy=layer.mask_strategy.name,
                target=target,
                origin="the state dict holds",
            )


def _check_elementwise(layer: Layer, new: Any, selected: torch.Tensor) -> None:
    shape = getattr(new, "shape", None)
    if shape is None or tuple(shape) != tuple(selected.shape):
        got = "no tensor" if shape is None else f"shape {tuple(shape)}"
        raise ConfigError(
            f"layer {layer.name!r}: aggregate strategy {layer.aggregate.name!r} is marked "
            f"elementwise but returned {got} for the selected features of shape "
            f"{tuple(selected.shape)}; an aggregate that changes the shape must be "
            "registered with elementwise=False"
        )


def _check_finite(layer: Layer, reduced: object, where: str) -> None:
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
            f"{where}: the data that reduce {layer.reduce.name!r} returned holds {bad} NaN "
            f"or Inf value(s) of {finite.numel()}; the calibration inputs (or an fp16 "
            "accumulator that overflowed) were not finite. No mask was stored: register "
            "the layer again to restart its aggregation"
        )
