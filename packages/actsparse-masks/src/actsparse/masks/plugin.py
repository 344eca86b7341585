"""The actsparse-masks plugin, registered through the ``actsparse`` entry-point group."""

from __future__ import annotations

from typing import Any

from actsparse.core import AggregateStrategy, MaskStrategy, ReduceStrategy, hookimpl
from actsparse.masks._checks import (
    check_block_norm,
    check_magnitude,
    check_n_m,
    check_sample_dims,
    check_target_threshold,
    check_threshold,
    check_topk,
)
from actsparse.masks._functions import magnitude_mask, mean_over_batch, sum_aggregate
from actsparse.masks._histogram import (
    HISTOGRAM_PARAMS,
    abs_histogram_aggregate,
    check_abs_histogram,
    column_norm,
    finalize_histogram,
    histogram_skipped,
    init_histogram,
    target_threshold,
)
from actsparse.masks._masks import block_norm_mask, n_m_mask, threshold_mask, topk_mask
from actsparse.masks._reduces import (
    identity_reduce,
    l2_over_batch,
    max_over_batch,
    sum_over_batch,
)
from actsparse.masks._streaming import (
    SAMPLE_DIMS,
    abs_max_aggregate,
    abs_mean_aggregate,
    feature_axis,
    finalize_max,
    finalize_mean,
    init_streaming,
    mean_aggregate,
    sq_mean_aggregate,
)


def _streaming(
    name: str, fn: object, finalize: object, description: str, combine: str | list[str]
) -> AggregateStrategy:
    return AggregateStrategy(
        name=name,
        fn=fn,  # type: ignore[arg-type]
        init=init_streaming,
        finalize=finalize,  # type: ignore[arg-type]
        feature_axis=feature_axis,
        params={SAMPLE_DIMS},
        description=description + "; keeps only the feature dims (sample_dims are folded)",
        combine=combine,
        check=check_sample_dims,
    )


#: How streaming accumulators combine across processes: sums and counts add up;
#: abs_max takes the maximum of row 0 (the running maximum) and adds row 1 (the count).
SUM_ROWS = "sum"
MAX_ROWS = ["max", "sum"]


def _threshold(name: str, scale: Any, description: str) -> MaskStrategy:
    """A dynamic strategy on an ``abs_histogram``: the score is ``|x|``, times ``scale``."""
    return MaskStrategy(
        name=name,
        fn=target_threshold,
        check=check_target_threshold,
        params={"sparsity_level"},
        required={"sparsity_level"},
        dynamic=True,
        target_key="sparsity_level",
        scale=scale,
        description=description,
    )


@hookimpl
def actsparse_aggregate_strategies() -> list[AggregateStrategy]:
    return [
        AggregateStrategy(
            name="sum",
            fn=sum_aggregate,
            elementwise=True,
            description="elementwise running sum of the inputs (x + y), as torch.ao's example",
            combine="sum",
        ),
        _streaming("mean", mean_aggregate, finalize_mean, "running mean of x", SUM_ROWS),
        _streaming("abs_mean", abs_mean_aggregate, finalize_mean, "running mean of |x|", SUM_ROWS),
        _streaming("sq_mean", sq_mean_aggregate, finalize_mean, "running mean of x ** 2", SUM_ROWS),
        _streaming("abs_max", abs_max_aggregate, finalize_max, "running maximum of |x|", MAX_ROWS),
        AggregateStrategy(
            name="abs_histogram",
            fn=abs_histogram_aggregate,
            init=init_histogram,
            finalize=finalize_histogram,
            params=HISTOGRAM_PARAMS,
            combine="sum",
            takes_valid=True,
            check=check_abs_histogram,
            skipped=histogram_skipped,
            description="log-spaced histogram of |x| over all positions (bounded memory), "
            "for target_threshold; feature_sums=True also keeps signed sums per feature for "
            "the offset that compensates the zeros",
        ),
    ]


@hookimpl
def actsparse_reduce_strategies() -> list[ReduceStrategy]:
    return [
        ReduceStrategy(name="mean", fn=mean_over_batch, description="mean over dim 0"),
        ReduceStrategy(
            name="identity",
            fn=identity_reduce,
            description="the data unchanged (the usual choice after a streaming aggregate)",
        ),
        ReduceStrategy(name="sum", fn=sum_over_batch, description="sum over dim 0"),
        ReduceStrategy(name="max", fn=max_over_batch, description="maximum over dim 0"),
        ReduceStrategy(name="l2", fn=l2_over_batch, description="Euclidean norm over dim 0"),
    ]


@hookimpl
def actsparse_mask_strategies() -> list[MaskStrategy]:
    return [
        MaskStrategy(
            name="magnitude",
            fn=magnitude_mask,
            check=check_magnitude,
            params={"sparsity_level"},
            required={"sparsity_level"},
            description="zero the round(sparsity_level * n) entries of smallest |x|",
        ),
        MaskStrategy(
            name="threshold",
            fn=threshold_mask,
            check=check_threshold,
            params={"threshold"},
            required={"threshold"},
            description="zero the entries with |x| <= threshold",
        ),
        MaskStrategy(
            name="topk",
            fn=topk_mask,
            check=check_topk,
            params={"k", "fraction", "dim"},
            description="keep the k (or round(fraction * size)) entries of largest |x| along dim",
        ),
        MaskStrategy(
            name="n_m",
            fn=n_m_mask,
            check=check_n_m,
            params={"n", "m", "dim"},
            required={"n", "m"},
            description="keep the n entries of largest |x| in every m consecutive along dim",
        ),
        MaskStrategy(
            name="block_norm",
            fn=block_norm_mask,
            check=check_block_norm,
            params={"sparsity_level", "sparse_block_shape", "zeros_per_block", "norm"},
            required={"sparsity_level"},
            description="torch.ao DataNormSparsifier's mask: sparsify the blocks of smallest norm",
        ),
        _threshold(
            "target_threshold",
            None,
            "dynamic: zero |x| <= t per input, t calibrated from an abs_histogram to reach "
            "sparsity_level",
        ),
        _threshold(
            "weighted_threshold",
            column_norm,
            "dynamic: zero |x_i| * ||W[:, i]|| <= t per input (WINA's weight-aware score), t "
            "calibrated from an abs_histogram of the score to reach sparsity_level",
        ),
    ]
