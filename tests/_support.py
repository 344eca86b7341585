"""Helpers shared by the test folders (``tests/`` is on ``sys.path`` for pytest)."""

from __future__ import annotations

from typing import Any

import torch


def same_state(left: Any, right: Any) -> bool:
    """Whether two masks, accumulators or state dicts are exactly equal.

    Tensors must agree in dtype, shape and every value; lists and tuples in
    type, length and items; dicts in keys and values; anything else by ``==``.
    """
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        return (
            isinstance(left, torch.Tensor)
            and isinstance(right, torch.Tensor)
            and left.dtype == right.dtype
            and left.shape == right.shape
            and bool(torch.equal(left, right))
        )
    if isinstance(left, (list, tuple)):
        return (
            type(left) is type(right)
            and len(left) == len(right)
            and all(same_state(a, b) for a, b in zip(left, right, strict=True))
        )
    if isinstance(left, dict):
        return (
            isinstance(right, dict)
            and left.keys() == right.keys()
            and all(same_state(v, right[k]) for k, v in left.items())
        )
    return bool(left == right)
