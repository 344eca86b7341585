"""Store a linear layer's weight input-major, once.

The zero-skipping kernel reads the weight as ``(in_features, out_features)``,
contiguous: the weights of one input form one contiguous row. nn.Linear keeps
``(out_features, in_features)``. :func:`to_input_major` re-stores the weight
in the kernel's layout and leaves ``linear.weight`` as the transposed view of
that storage, so the model holds one copy of its weights, the dense path
(``F.linear`` accepts the transposed view) and the state dict keep working,
and the kernel reads the same memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["is_input_major", "to_input_major", "to_output_major"]


def _weight(linear: nn.Linear) -> nn.Parameter:
    weight = linear.weight
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        raise TypeError(f"expected an nn.Linear with a 2-D weight parameter, got {linear!r}")
    return weight


def _whole_storage(weight: Tensor) -> bool:
    return weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()


def is_input_major(linear: nn.Linear) -> bool:
    """Whether ``linear.weight`` is the transposed view of a contiguous ``(in, out)`` storage."""
    weight = _weight(linear)
    return weight.T.is_contiguous() and weight.storage_offset() == 0 and _whole_storage(weight)


def to_input_major(linear: nn.Linear) -> Tensor:
    """Re-store ``linear.weight`` input-major; return the ``(in, out)`` contiguous tensor.

    Afterwards the weight's storage holds ``weight.T`` contiguously, once:
    ``linear.weight`` is still the same :class:`~torch.nn.Parameter` object
    (optimizers, hooks and tied weights keep referring to it) with the same
    values, shape ``(out, in)`` and ``requires_grad``, but its strides are
    those of the transposed view. ``F.linear`` and ``state_dict()`` see the
    same weights as before. The returned tensor is ``linear.weight.T``
    detached: it shares the storage (``data_ptr()`` is the parameter's); to
    let gradients reach the parameter, pass ``linear.weight.T`` instead.

    Idempotent; the old storage is freed unless something else holds it.
    Code that needs a contiguous weight (``safetensors`` refuses
    non-contiguous tensors) should call :func:`to_output_major` first or save
    ``weight.contiguous()``.
    """
    weight = _weight(linear)
    if not is_input_major(linear):
        with torch.no_grad():
            weight.data = weight.detach().T.contiguous().T
    return weight.detach().T


def to_output_major(linear: nn.Linear) -> Tensor:
    """Undo :func:`to_input_major`: store ``linear.weight`` contiguous ``(out, in)`` again.

    Returns the weight (detached). One copy of the weight while converting.
    """
    weight = _weight(linear)
    if not (weight.is_contiguous() and weight.storage_offset() == 0 and _whole_storage(weight)):
        with torch.no_grad():
            weight.data = weight.detach().contiguous()
    return weight.detach()
