"""The hook implementations that the ``actsparse`` entry point names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from actsparse.core import AggregateStrategy, ConfigError, MaskStrategy, hookimpl

# --------------------------------------------------------------- aggregate
# The accumulator is a (2, D) tensor: row 0 counts the samples in which each
# feature was positive, row 1 counts the samples. Its size depends only on D.


def init_rate(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((2, x.shape[-1]), dtype=torch.float32, device=x.device)


def fold_rate(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    positive = (rows > 0).sum(dim=0, dtype=acc.dtype)
    return torch.stack((acc[0] + positive, acc[1] + rows.shape[0]))


def finalize_rate(acc: torch.Tensor) -> torch.Tensor:
    return acc[0] / acc[1]


def rate_feature_axis(dim: int, ndim: int) -> int:
    # Only the last input dimension survives; it is dimension 1 of the accumulator.
    if dim != ndim - 1:
        raise ConfigError("active_rate keeps only the last dimension of its input")
    return 1


# -------------------------------------------------------------------- mask


def check_margin(options: Mapping[str, Any]) -> None:
    """The record's ``check``: ``register_layer`` refuses a bad ``margin`` with it."""
    margin = options.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ConfigError(f"margin must be a number, got {margin!r}")


def keep_positive(data: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Ones where ``data > margin``, zeros elsewhere, in ``data``'s dtype."""
    check_margin({"margin": margin})
    return (data > margin).to(data.dtype)


# ------------------------------------------------------------------- hooks


@hookimpl
def actsparse_aggregate_strategies() -> list[AggregateStrategy]:
    return [
        AggregateStrategy(
            name="active_rate",
            fn=fold_rate,
            init=init_rate,
            finalize=finalize_rate,
            feature_axis=rate_feature_axis,
            # both rows are counts: ranks of a torch.distributed group add them up
            combine="sum",
            description="running fraction of samples in which each feature is positive",
        )
    ]


@hookimpl
def actsparse_mask_strategies() -> list[MaskStrategy]:
    return [
        MaskStrategy(
            name="keep_positive",
            fn=keep_positive,
            params={"margin"},
            check=check_margin,
            description="keep the entries above margin (default 0.0)",
        )
    ]
