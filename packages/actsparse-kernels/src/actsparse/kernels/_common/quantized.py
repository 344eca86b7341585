"""What the weight-only quantized kernels share: their op, their weights, ``apply`` and
``release``.

A quantized kernel (``cpu_sparse_int8``, ``cpu_sparse_int4``) is lossy: when
it is applied to an ``nn.Linear`` it quantizes the weight and keeps only the
quantized bytes. The float weight is not kept beside them: the parameter
``layer.weight`` stays the same :class:`~torch.nn.Parameter` object, with the
layer's shape, dtype and device, but becomes a placeholder that holds one NaN
(a zero-stride view of four bytes), so the model's weight memory is that of
the quantized weights. While the kernel holds a layer:

* ``state_dict()`` gives the dequantized weight under ``weight`` (built on
  each call; a float copy exists only while the state dict is alive), so a
  saved model loads into an ordinary float model;
* ``load_state_dict()`` quantizes the weight it loads into the kernel's
  storage (what the kernel computes with from then on);
* ``release`` (:attr:`KernelStrategy.release <actsparse.core.KernelStrategy>`,
  called by the runtime when it detaches the kernel: ``set_kernel("dense")``,
  another kernel, unsquashing) writes the dequantized weight back into the
  parameter: the dense path then computes with exactly the values the kernel
  used. Applying the kernel again to those values gives back the same
  quantized weights (the quantizers are idempotent).

Each kernel supplies a :class:`QuantizedFormat`: how to quantize and
dequantize, and its op, declared with :func:`define_quantized_op`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from actsparse.core import ConfigError, KernelStrategy, Tolerance
from actsparse.kernels._common.build import NAMESPACE, CppExtension
from actsparse.kernels._common.linear import linear_support
from actsparse.kernels._common.status import KernelStatus

__all__ = [
    "QuantizedFormat",
    "QuantizedOpImpl",
    "QuantizedWeights",
    "define_quantized_op",
    "isa_status",
    "quantized_kernel",
    "quantized_apply",
    "quantized_release",
    "quantized_support",
    "quantized_weights",
]


@attrs.frozen(eq=False)
class QuantizedWeights:
    """A linear layer's weight as a quantized kernel stores it, input-major.

    Attributes:
        qweight: The quantized values, one row per input feature (``int8``
            ``(in, out)``, or two 4-bit values per byte).
        scales: The scales (per output channel, or per group of outputs in
            each row).
        zeros: The zero points of an asymmetric format, or None.
        in_features: The layer's input features.
        out_features: The layer's output features.
    """

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        """The bytes the kernel keeps for the weight (values, scales and zero points)."""
        tensors = [self.qweight, self.scales] + ([] if self.zeros is None else [self.zeros])
        return sum(t.numel() * t.element_size() for t in tensors)

    def copy_(self, other: QuantizedWeights) -> None:
        """Overwrite these tensors in place with ``other``'s (same format and shape)."""
        self.qweight.copy_(other.qweight)
        self.scales.copy_(other.scales)
        if self.zeros is not None and other.zeros is not None:
            self.zeros.copy_(other.zeros)


#: ``fn(x, qweight, scales, zeros, bias, threshold, out_features) -> y``: the CPU impl.
QuantizedOpImpl = Callable[
    [Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None", float, int], Tensor
]


@attrs.frozen(eq=False)
class QuantizedFormat:
    """How one quantized kernel stores a weight, and computes with it.

    Attributes:
        name: The kernel's name (for messages).
        quantize: ``quantize(weight) -> QuantizedWeights`` from a float32
            ``(out, in)`` weight.
        dequantize: ``dequantize(weights) -> Tensor``: the float32 ``(out, in)``
            weight the quantized one stands for (what the dense path computes
            with after ``release``).
        op: The kernel's op (:func:`define_quantized_op`).
    """

    name: str
    quantize: Callable[[Tensor], QuantizedWeights]
    dequantize: Callable[[QuantizedWeights], Tensor]
    op: Callable[..., Tensor]


# ------------------------------------------------------------------ the op


def _dequantized_t(
    dequantize: Callable[[QuantizedWeights], Tensor],
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    out_features: int,
) -> Tensor:
    in_features = qweight.shape[0]
    weights = QuantizedWeights(qweight, scales, zeros, in_features, out_features)
    return dequantize(weights).T


def define_quantized_op(
    name: str,
    cpu: QuantizedOpImpl,
    dequantize: Callable[[QuantizedWeights], Tensor],
) -> Callable[..., Tensor]:
    """Declare ``actsparse::<name>(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros,
    Tensor? bias, float threshold, int out_features) -> Tensor``.

    ``cpu`` computes it on the CPU; ``dequantize`` gives the float weight, for
    the input gradient (that of hardshrink and linear on the dequantized
    weight; the quantized weights get none) and for other devices, which
    compute the reference ``F.linear(F.hardshrink(x, t), W, b)``. The op has a
    fake implementation (the output's shape), so ``torch.compile(fullgraph=True)``
    traces it as one node. Returns the op's default overload.
    """
    qualname = f"actsparse::{name}"
    library = torch.library.Library("actsparse", "FRAGMENT")  # type: ignore[no-untyped-call]
    library.define(  # type: ignore[no-untyped-call]
        f"{name}(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
        "float threshold, int out_features) -> Tensor"
    )

    def check(x: Tensor, qweight: Tensor, out_features: int) -> None:
        if x.dim() < 1 or x.shape[-1] != qweight.shape[0]:
            raise ConfigError(
                f"{name}: x must have shape (*, {qweight.shape[0]}), got {tuple(x.shape)}"
            )
        if x.dtype != torch.float32:
            raise ConfigError(f"{name}: x must be float32, got {x.dtype}")
        if out_features < 0:
            raise ConfigError(f"{name}: out_features must be >= 0, got {out_features}")

    def run_cpu(
        x: Tensor,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        bias: Tensor | None,
        threshold: float,
        out_features: int,
    ) -> Tensor:
        check(x, qweight, out_features)
        return cpu(x, qweight, scales, zeros, bias, threshold, out_features)

    def run_elsewhere(
        x: Tensor,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        bias: Tensor | None,
        threshold: float,
        out_features: int,
    ) -> Tensor:
        check(x, qweight, out_features)
        weight_t = _dequantized_t(dequantize, qweight, scales, zeros, out_features)
        return F.linear(F.hardshrink(x, threshold), weight_t.T.to(x.device), bias)

    def fake(
        x: Tensor,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        bias: Tensor | None,
        threshold: float,
        out_features: int,
    ) -> Tensor:
        check(x, qweight, out_features)
        return x.new_empty((*x.shape[:-1], out_features))

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, qweight, scales, zeros, _bias, threshold, out_features = inputs
        ctx.save_for_backward(x, qweight, scales, zeros)
        ctx.threshold = threshold
        ctx.out_features = out_features

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, qweight, scales, zeros = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight_t = _dequantized_t(dequantize, qweight, scales, zeros, ctx.out_features)
            grad_x = torch.ops.aten.hardshrink_backward(
                grad @ weight_t.T.to(grad.device), x, ctx.threshold
            )
        return grad_x, None, None, None, None, None, None

    torch.library.impl(qualname, "CPU", run_cpu, lib=library)
    torch.library.impl(qualname, "CompositeExplicitAutograd", run_elsewhere, lib=library)
    torch.library.register_fake(qualname, fake, lib=library)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=library)
    _libraries.append(library)
    op: Callable[..., Tensor] = getattr(torch.ops.actsparse, name).default
    return op


#: the libraries that hold the ops' registrations (dropping one would undo them)
_libraries: list[Any] = []


# ------------------------------------------------------------------ apply and release


@attrs.define(eq=False)
class _Held:
    """A layer whose weight a quantized kernel holds."""

    format: QuantizedFormat
    weights: QuantizedWeights
    hooks: list[RemovableHandle]


_held: weakref.WeakKeyDictionary[nn.Module, _Held] = weakref.WeakKeyDictionary()


def quantized_weights(module: nn.Module) -> QuantizedWeights | None:
    """The quantized weights a quantized kernel holds for ``module``, or None."""
    held = _held.get(module)
    return None if held is None else held.weights


def _weight_of(module: nn.Module) -> Tensor:
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise ConfigError(f"{type(module).__name__} has no weight tensor")
    return weight


def _placeholder(weight: Tensor) -> Tensor:
    """A tensor of ``weight``'s shape, dtype and device that stores one NaN."""
    return torch.full((), math.nan, dtype=weight.dtype, device=weight.device).expand(weight.shape)


def _hold(module: nn.Linear, fmt: QuantizedFormat) -> _Held:
    weight = module.weight
    with torch.no_grad():
        weights = fmt.quantize(weight.detach().to(torch.float32))

    def state_dict_hook(
        module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        held = _held.get(module)
        if held is not None and prefix + "weight" in state_dict:
            like = _weight_of(module)
            state_dict[prefix + "weight"] = held.format.dequantize(held.weights).to(
                dtype=like.dtype, device=like.device
            )

    def load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        held = _held.get(module)
        key = prefix + "weight"
        loaded = state_dict.get(key)
        if held is None or not isinstance(loaded, Tensor):
            return
        weight = _weight_of(module)
        if tuple(loaded.shape) != tuple(weight.shape):
            return  # torch reports the mismatch
        with torch.no_grad():
            held.weights.copy_(held.format.quantize(loaded.detach().to(torch.float32)))
        # torch copies the placeholder onto itself: a no-op
        state_dict[key] = weight

    hooks = [
        module.register_state_dict_post_hook(state_dict_hook),  # type: ignore[no-untyped-call]
        module.register_load_state_dict_pre_hook(load_hook),  # type: ignore[no-untyped-call]
    ]
    with torch.no_grad():
        weight.data = _placeholder(weight)
    return _Held(fmt, weights, hooks)


def quantized_apply(
    fmt: QuantizedFormat,
) -> Callable[[nn.Linear, float], Callable[[Tensor], Tensor]]:
    """A lossy ``KernelStrategy.apply`` that quantizes an ``nn.Linear`` with ``fmt``.

    The first call on a layer quantizes its weight and replaces it by the
    placeholder (module docstring); later calls, until :func:`quantized_release`,
    reuse the quantized weights. The returned ``fn(x)`` is ``fmt.op`` on them:
    the layer on the dequantized weight, with ``|x| <= threshold`` zeroed.
    """

    def apply(module: nn.Linear, threshold: float) -> Callable[[Tensor], Tensor]:
        held = _held.get(module)
        if held is not None and held.format is not fmt:
            quantized_release(module)
            held = None
        if held is None:
            held = _hold(module, fmt)
            _held[module] = held
        weights = held.weights
        bias = None if module.bias is None else module.bias.detach()
        op = fmt.op

        def run(x: Tensor) -> Tensor:
            return op(
                x,
                weights.qweight,
                weights.scales,
                weights.zeros,
                bias,
                threshold,
                weights.out_features,
            )

        return run

    return apply


def quantized_release(module: nn.Module) -> None:
    """``KernelStrategy.release`` of a quantized kernel: write the dequantized weight back
    into ``module.weight`` (its dtype and device) and forget the quantized one."""
    held = _held.pop(module, None)
    if held is None:
        return
    for hook in held.hooks:
        hook.remove()
    weight = _weight_of(module)
    with torch.no_grad():
        weight.data = held.format.dequantize(held.weights).to(
            dtype=weight.dtype, device=weight.device
        )


def quantized_support(module: Any) -> str | None:
    """None for a float32 ``nn.Linear`` on the CPU with finite weights, else why a quantized
    CPU kernel cannot compute it (checked when the kernel is chosen, before anything
    changes)."""
    reason = linear_support(module, device_type="cpu", dtypes=(torch.float32,), where="on the CPU")
    if reason is not None:
        return reason
    if _held.get(module) is None and not bool(torch.isfinite(module.weight.detach()).all()):
        return "its weight holds NaN or inf, which no quantized format stores"
    return None


def isa_status(extension: CppExtension, isa_op: str, *, build: bool = True) -> KernelStatus:
    """``extension``'s status, its reason naming the vector path the build compiled
    (``"avx512"``, ``"avx2"`` or ``"scalar"``, from the operator ``isa_op``)."""
    status = extension.status(build=build)
    if not status.available:
        return status
    isa: str = getattr(getattr(torch.ops, NAMESPACE), isa_op)()
    return KernelStatus(True, f"{status.reason} ({isa} path)")


def quantized_kernel(
    fmt: QuantizedFormat,
    status: Callable[[], KernelStatus],
    tolerance: Tolerance,
    description: str,
) -> KernelStrategy:
    """The lossy ``KernelStrategy`` of a quantized CPU kernel: float32 ``nn.Linear`` layers,
    ``apply`` and ``release`` as above, no crossover (``"auto"`` never picks it)."""

    def available() -> str | None:
        current = status()
        return None if current.available else current.reason

    return KernelStrategy(
        name=fmt.name,
        supports=quantized_support,
        apply=quantized_apply(fmt),
        available=available,
        release=quantized_release,
        tolerance=tolerance,
        description=description,
    )
