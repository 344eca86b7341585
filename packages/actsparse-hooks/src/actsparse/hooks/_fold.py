"""Fold static per-input-feature masks into weights, and optionally prune.

A squashed layer multiplies its input by a fixed mask on every call. When the
layer is linear in its input and the mask varies only along the input-feature
axis (the last dimension of an ``nn.Linear`` input, the channel dimension of an
``nn.ConvNd`` input), ``layer(x * m) == layer_with_weight_scaled_by_m(x)``: the
mask can live in the weights and the hook can go. With ``prune=True`` the
input features whose mask is zero are removed for good, so the multiply-adds
that the mask zeroed are no longer computed:

* if the layer's input comes straight from a producing ``nn.Linear`` (or
  ``nn.ConvNd`` of the same kind) through elementwise activations only, and
  nothing else reads that producer's output, the producer loses the matching
  output rows and the layer the matching weight columns (both modules keep
  their class and their place in the model);
* otherwise the layer is replaced by a :class:`PrunedLinear` /
  ``PrunedConv{1,2,3}d`` that gathers the kept input features with one
  ``index_select`` and runs a smaller dense layer.

Everything is planned (and checked) before the model changes.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import fx, nn

from actsparse.core import SPARSIFY
from actsparse.hooks._layer import Layer
from actsparse.hooks._static import StaticMask

__all__ = [
    "PrunedConv1d",
    "PrunedConv2d",
    "PrunedConv3d",
    "PrunedLinear",
    "fold_layers",
]

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: modules applied to each element independently: removing features before
#: them removes exactly the same features after them
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Dropout,
)
_ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.relu,
        F.relu6,
        F.gelu,
        F.silu,
        F.mish,
        F.leaky_relu,
        F.elu,
        F.hardswish,
        F.dropout,
        torch.relu,
        torch.tanh,
        torch.sigmoid,
        operator.neg,
    }
)
_ELEMENTWISE_METHODS = frozenset({"relu", "tanh", "sigmoid", "neg", "contiguous"})


# --------------------------------------------------------------- pruned layers


class PrunedLinear(nn.Linear):
    """An ``nn.Linear`` over the kept input features of a wider input.

    ``forward(x)`` is ``linear(x.index_select(-1, kept), weight, bias)``;
    ``in_features`` counts the kept features and ``full_in_features`` the
    width of the input it accepts.
    """

    kept: torch.Tensor

    def __init__(
        self,
        kept: torch.Tensor,
        full_in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        with warnings.catch_warnings():  # every input feature may be pruned
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            super().__init__(int(kept.numel()), out_features, bias=bias, device=device, dtype=dtype)
        self.full_in_features = full_in_features
        self.register_buffer("kept", kept.to(device=device, dtype=torch.long))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input.index_select(-1, self.kept), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_in_features={self.full_in_features}"


class _PrunedConvMixin:
    kept: torch.Tensor
    full_in_channels: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    kernel_size: tuple[int, ...]
    _conv_forward: Callable[..., torch.Tensor]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        channel_dim = -(len(self.kernel_size) + 1)
        return self._conv_forward(
            input.index_select(channel_dim, self.kept), self.weight, self.bias
        )


class PrunedConv1d(_PrunedConvMixin, nn.Conv1d):
    """An ``nn.Conv1d`` over the kept input channels (gathered with ``index_select``)."""


class PrunedConv2d(_PrunedConvMixin, nn.Conv2d):
    """An ``nn.Conv2d`` over the kept input channels (gathered with ``index_select``)."""


class PrunedConv3d(_PrunedConvMixin, nn.Conv3d):
    """An ``nn.Conv3d`` over the kept input channels (gathered with ``index_select``)."""


_PRUNED_CONV: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: PrunedConv1d,
    nn.Conv2d: PrunedConv2d,
    nn.Conv3d: PrunedConv3d,
}


# ------------------------------------------------------------------ analysis


def _feature_axis(module: nn.Module) -> tuple[int, int] | None:
    """(position of the input-feature axis counted from the right, its size), or None."""
    if type(module) is nn.Linear:
        return 1, module.in_features
    if type(module) in _CONVS and module.groups == 1:  # type: ignore[union-attr]
        return len(module.kernel_size) + 1, module.in_channels  # type: ignore[arg-type,return-value]
    return None


def _as_vector(mask: torch.Tensor, axis: int, size: int, ndim: int | None) -> torch.Tensor | None:
    """The mask as a vector along the feature axis, or None if it varies elsewhere.

    ``axis`` counts from the right. With ``ndim`` (the input's rank) the mask
    must not have more dimensions than the input.
    """
    if ndim is not None and mask.ndim > ndim:
        return None
    shape = tuple(mask.shape)
    for position in range(1, len(shape) + 1):
        extent = shape[-position]
        if position == axis:
            if extent not in (1, size):
                return None
        elif extent != 1:
            return None
    flat = mask.reshape(-1)
    return flat.expand(size) if flat.numel() == 1 else flat


def feature_vector(layer: Layer) -> torch.Tensor | None:
    """The layer's static mask as one value per input feature, or None if it is not one."""
    if layer.hook_state != SPARSIFY or layer.mask is None:
        return None
    found = _feature_axis(layer.module)
    if found is None:
        return None
    axis, size = found
    spec = layer.features
    if spec is None:
        mask = layer.mask
        if not isinstance(mask, torch.Tensor):
            return None
        return _as_vector(mask, axis, size, None)
    # With features, the input's rank tells where feature_dim lies.
    if layer.input_shape is not None:
        ndim = len(layer.input_shape)
    elif isinstance(layer.mode, StaticMask) and layer.mode.applied_ndim is not None:
        ndim = layer.mode.applied_ndim
    else:
        return None
    if not -ndim <= spec.dim < ndim or ndim - spec.dim % ndim != axis:
        return None
    masks = layer.mask
    if not isinstance(masks, list) or len(masks) != len(spec.groups):
        return None
    vector: torch.Tensor | None = None
    for group, mask in zip(spec.groups, masks, strict=True):
        if not isinstance(mask, torch.Tensor) or max(group) >= size:
            return None
        part = _as_vector(mask, axis, len(group), ndim)
        if part is None:
            return None
        if vector is None:
            vector = torch.ones(size, dtype=torch.float64, device=mask.device)
        vector[list(group)] = part.to(device=vector.device, dtype=vector.dtype)
    return vector


def _hooks_other_than(module: nn.Module, own: int | None) -> int:
    count = sum(1 for key in module._forward_pre_hooks if key != own)
    for hooks in (module._forward_hooks, module._backward_hooks, module._backward_pre_hooks):
        count += len(hooks)
    return count


def _shared_parameters(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, n in seen.items() if n > 1}


def _is_elementwise(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return (
            type(module) in _ELEMENTWISE_MODULES
            and module is not None
            and _hooks_other_than(module, None) == 0
        )
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def _find_producers(model: nn.Module, consumers: Iterable[str]) -> dict[str, str]:
    """Consumer name -> the producer whose output rows can be removed instead of gathering."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # any model that fx cannot trace simply gets the gather
        return {}
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    shared = _shared_parameters(model)
    found: dict[str, str] = {}
    claimed: set[str] = set()
    for consumer in consumers:
        sites = calls.get(consumer, [])
        if len(sites) != 1 or len(sites[0].args) != 1 or sites[0].kwargs:
            continue
        node = sites[0].args[0]
        while isinstance(node, fx.Node) and _is_elementwise(node, modules):
            if len(node.users) != 1 or any(isinstance(a, fx.Node) for a in node.args[1:]):
                node = None
                break
            node = node.args[0] if node.args else None
        if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1:
            continue
        name = str(node.target)
        producer = modules.get(name)
        target = modules[consumer]
        if producer is None or name == consumer or name in claimed:
            continue
        if len(calls.get(name, [])) != 1 or type(producer) is not type(target):
            continue
        if isinstance(producer, _CONVS) and producer.groups != 1:
            continue
        if producer._forward_hooks or any(id(p) in shared for p in producer.parameters()):
            continue
        found[consumer] = name
        claimed.add(name)
    return found


# ---------------------------------------------------------------------- plan


@attrs.frozen
class _Plan:
    name: str
    vector: torch.Tensor
    kept: torch.Tensor | None  # None: scale only
    producer: str | None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _parameter(like: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


def _scale_columns(module: nn.Module, vector: torch.Tensor) -> None:
    weight: nn.Parameter = module.weight  # type: ignore[assignment]
    shape = [1] * weight.ndim
    shape[1] = -1
    weight.mul_(vector.to(device=weight.device, dtype=weight.dtype).view(shape))


def _keep_columns(module: nn.Module, kept: torch.Tensor) -> None:
    weight: nn.Parameter = module.weight  # type: ignore[assignment]
    module.weight = _parameter(weight, weight.index_select(1, kept.to(weight.device)))
    if isinstance(module, nn.Linear):
        module.in_features = int(kept.numel())
    else:
        module.in_channels = int(kept.numel())  # type: ignore[assignment]


def _keep_rows(module: nn.Module, kept: torch.Tensor) -> None:
    weight: nn.Parameter = module.weight  # type: ignore[assignment]
    index = kept.to(weight.device)
    module.weight = _parameter(weight, weight.index_select(0, index))
    bias = module.bias
    if isinstance(bias, nn.Parameter):
        module.bias = _parameter(bias, bias.index_select(0, index))
    if isinstance(module, nn.Linear):
        module.out_features = int(kept.numel())
    else:
        module.out_channels = int(kept.numel())  # type: ignore[assignment]


def _gathering(module: nn.Module, kept: torch.Tensor) -> nn.Module:
    weight: nn.Parameter = module.weight  # type: ignore[assignment]
    bias = module.bias
    index = kept.to(weight.device)
    pruned: nn.Module
    if isinstance(module, nn.Linear):
        pruned = PrunedLinear(
            index,
            module.in_features,
            module.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
    else:
        conv: Any = module
        pruned = _PRUNED_CONV[type(module)](
            int(kept.numel()),
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=1,
            bias=bias is not None,
            padding_mode=conv.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        pruned.full_in_channels = conv.in_channels
        pruned.register_buffer("kept", index.to(torch.long))
    pruned.weight = _parameter(weight, weight.index_select(1, index))
    if isinstance(bias, nn.Parameter):
        pruned.bias = _parameter(bias, bias)
    pruned.train(module.training)
    return pruned


def fold_layers(model: nn.Module, layers: Mapping[str, Layer], prune: bool) -> list[str]:
    """Fold every foldable squashed layer of ``layers`` into ``model``; return their names.

    The caller removes the returned layers from its registry; their hooks are
    already detached here.
    """
    plans: list[_Plan] = []
    for name, layer in layers.items():
        vector = feature_vector(layer)
        if vector is None:
            continue
        kept: torch.Tensor | None = None
        if prune:
            nonzero = (vector != 0).nonzero().flatten().cpu()
            prunable = _hooks_other_than(layer.module, _handle_id(layer)) == 0
            # a conv needs at least one input channel
            if (
                prunable
                and nonzero.numel() < vector.numel()
                and (nonzero.numel() > 0 or isinstance(layer.module, nn.Linear))
            ):
                kept = nonzero
        plans.append(_Plan(name, vector, kept, None))
    if not plans:
        return []
    if prune:
        pruning = [p.name for p in plans if p.kept is not None]
        producers = _find_producers(model, pruning) if pruning else {}
        plans = [attrs.evolve(p, producer=producers.get(p.name)) for p in plans]
    # Everything is decided: change the model.
    with torch.no_grad():
        for plan in plans:
            layer = layers[plan.name]
            layer.detach()
            module = model.get_submodule(plan.name)
            _scale_columns(module, plan.vector)
            if plan.kept is None:
                continue
            if plan.producer is not None:
                _keep_rows(model.get_submodule(plan.producer), plan.kept)
                _keep_columns(module, plan.kept)
            else:
                _set_module(model, plan.name, _gathering(module, plan.kept))
    return [plan.name for plan in plans]


def _handle_id(layer: Layer) -> int | None:
    handle = layer.handle
    return None if handle is None else handle.id
