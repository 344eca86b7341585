"""What every zero-skipping linear op computes, and the parts they share.

Each such op, ``actsparse::<name>(x, weight_t, bias, threshold)``, stands for
:func:`sparse_linear_reference`: input entries with ``|x| <= threshold`` are
zeroed (NaN and inf are kept), then the linear layer with the input-major
weight ``weight_t`` (``(in_features, out_features)``) is applied.
:func:`define_op` declares such an op in the ``actsparse`` namespace with the
argument checks, the fake implementation that ``torch.compile`` traces and
the autograd formula (that of hardshrink and linear), so a kernel supplies
only its device implementations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from actsparse.core import ConfigError

__all__ = [
    "OpImpl",
    "backward",
    "check_arguments",
    "define_op",
    "setup_context",
    "sparse_linear_reference",
]

#: ``fn(x, weight_t, bias, threshold) -> y``: one device's implementation of an op.
OpImpl = Callable[[Tensor, Tensor, "Tensor | None", float], Tensor]


def sparse_linear_reference(
    x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float
) -> Tensor:
    """The dense computation the ops stand for: hardshrink, then ``F.linear`` on ``weight_t.T``."""
    return F.linear(F.hardshrink(x, threshold), weight_t.T, bias)


def check_arguments(
    x: Tensor, weight_t: Tensor, bias: Tensor | None, *, op: str = "sparse_linear"
) -> None:
    """Refuse arguments that no zero-skipping linear op accepts, naming ``op``."""
    if x.dim() < 1:
        raise ConfigError(f"{op}: x must have a feature dimension, got shape {x.shape}")
    if weight_t.dim() != 2:
        raise ConfigError(
            f"{op}: weight_t must be 2-D (in_features, out_features), got {weight_t.shape}"
        )
    if x.shape[-1] != weight_t.shape[0]:
        raise ConfigError(
            f"{op}: x has {x.shape[-1]} features but weight_t is {tuple(weight_t.shape)} "
            "(in_features, out_features); pass the input-major weight, linear.weight.T"
        )
    if bias is not None and tuple(bias.shape) != (weight_t.shape[1],):
        raise ConfigError(
            f"{op}: bias must have shape ({weight_t.shape[1]},), got {tuple(bias.shape)}"
        )
    tensors = [x, weight_t] if bias is None else [x, weight_t, bias]
    if len({t.dtype for t in tensors}) != 1:
        raise ConfigError(
            f"{op}: x, weight_t and bias must share one dtype, got "
            + ", ".join(str(t.dtype) for t in tensors)
        )
    if len({t.device for t in tensors}) != 1:
        raise ConfigError(
            f"{op}: x, weight_t and bias must be on one device, got "
            + ", ".join(str(t.device) for t in tensors)
        )


# ------------------------------------------------------------------ autograd


def setup_context(
    ctx: torch.autograd.function.FunctionCtx,
    inputs: tuple[Tensor, Tensor, Tensor | None, float],
    output: Tensor,
) -> None:
    x, weight_t, bias, threshold = inputs
    ctx.save_for_backward(x, weight_t)
    ctx.threshold = threshold  # type: ignore[attr-defined]
    ctx.has_bias = bias is not None  # type: ignore[attr-defined]


def backward(
    ctx: torch.autograd.function.FunctionCtx, grad: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    """The gradients of hardshrink and linear: ``x``, ``weight_t`` and ``bias`` all get one."""
    x, weight_t = ctx.saved_tensors  # type: ignore[attr-defined]
    threshold: float = ctx.threshold  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    grad_x = grad_weight_t = grad_bias = None
    if needs[0]:
        grad_x = torch.ops.aten.hardshrink_backward(grad @ weight_t.T, x, threshold)
    if needs[1]:
        shrunk = F.hardshrink(x, threshold).reshape(-1, x.shape[-1])
        grad_weight_t = shrunk.T @ grad.reshape(-1, grad.shape[-1])
    if needs[2] and ctx.has_bias:  # type: ignore[attr-defined]
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_weight_t, grad_bias, None


# ------------------------------------------------------------------ declaring an op

#: the libraries that hold the ops' registrations (dropping one would undo them)
_libraries: list[Any] = []


def define_op(name: str, impls: Mapping[str, OpImpl]) -> Callable[..., Tensor]:
    """Declare ``actsparse::<name>(Tensor x, Tensor weight_t, Tensor? bias, float threshold)``.

    ``impls`` maps dispatch keys (``"CPU"``, ``"CUDA"``,
    ``"CompositeExplicitAutograd"`` for every other device) to implementations;
    each is called after :func:`check_arguments`. The op also gets a fake
    implementation (the output's shape, for ``torch.compile(fullgraph=True)``,
    which traces it as one node) and the autograd formula of :func:`backward`.
    Returns the op's default overload.
    """
    qualname = f"actsparse::{name}"
    # a fragment: every kernel adds its op to the one actsparse namespace
    library = torch.library.Library("actsparse", "FRAGMENT")  # type: ignore[no-untyped-call]
    library.define(  # type: ignore[no-untyped-call]
        f"{name}(Tensor x, Tensor weight_t, Tensor? bias, float threshold) -> Tensor"
    )

    def checked(impl: OpImpl) -> OpImpl:
        def run(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
            check_arguments(x, weight_t, bias, op=name)
            return impl(x, weight_t, bias, threshold)

        return run

    def fake(x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
        check_arguments(x, weight_t, bias, op=name)
        return x.new_empty((*x.shape[:-1], weight_t.shape[1]))

    for key, impl in impls.items():
        torch.library.impl(qualname, key, checked(impl), lib=library)
    torch.library.register_fake(qualname, fake, lib=library)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=library)
    _libraries.append(library)
    op: Callable[..., Tensor] = getattr(torch.ops.actsparse, name).default
    return op
