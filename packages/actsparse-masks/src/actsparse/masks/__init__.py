"""actsparse.masks: the built-in aggregate, reduce and mask strategies.

They register through the ``actsparse`` entry-point group like any third-party
plugin; the functions are also importable for direct use.
"""

from __future__ import annotations

import importlib.metadata

from actsparse.masks._functions import magnitude_mask, mean_over_batch, sum_aggregate
from actsparse.masks._histogram import (
    FeatureSums,
    abs_histogram_aggregate,
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
    abs_max_aggregate,
    abs_mean_aggregate,
    feature_axis,
    finalize_max,
    finalize_mean,
    init_streaming,
    mean_aggregate,
    resolve_sample_dims,
    sq_mean_aggregate,
)

__version__ = importlib.metadata.version("actsparse-masks")

__all__ = [
    "FeatureSums",
    "__version__",
    "abs_histogram_aggregate",
    "abs_max_aggregate",
    "abs_mean_aggregate",
    "block_norm_mask",
    "column_norm",
    "feature_axis",
    "finalize_histogram",
    "histogram_skipped",
    "finalize_max",
    "finalize_mean",
    "identity_reduce",
    "init_histogram",
    "init_streaming",
    "l2_over_batch",
    "magnitude_mask",
    "max_over_batch",
    "mean_aggregate",
    "mean_over_batch",
    "n_m_mask",
    "resolve_sample_dims",
    "sq_mean_aggregate",
    "sum_aggregate",
    "sum_over_batch",
    "target_threshold",
    "threshold_mask",
    "topk_mask",
]
