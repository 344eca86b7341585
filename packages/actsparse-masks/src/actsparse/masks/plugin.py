"""The actsparse-masks plugin, registered through the ``actsparse`` entry-point group."""

from __future__ import annotations

from actsparse.core import AggregateStrategy, MaskStrategy, ReduceStrategy, hookimpl
from actsparse.masks._functions import magnitude_mask, mean_over_batch, sum_aggregate


@hookimpl
def actsparse_aggregate_strategies() -> list[AggregateStrategy]:
    return [
        AggregateStrategy(
            name="sum",
            fn=sum_aggregate,
            elementwise=True,
            description="elementwise running sum of the inputs (x + y), as torch.ao's example",
        ),
    ]


@hookimpl
def actsparse_reduce_strategies() -> list[ReduceStrategy]:
    return [
        ReduceStrategy(name="mean", fn=mean_over_batch, description="mean over dim 0"),
    ]


@hookimpl
def actsparse_mask_strategies() -> list[MaskStrategy]:
    return [
        MaskStrategy(
            name="magnitude",
            fn=magnitude_mask,
            params={"sparsity_level"},
            required={"sparsity_level"},
            description="zero the round(sparsity_level * n) entries of smallest |x|",
        ),
    ]
