"""actsparse.masks: the built-in aggregate, reduce and mask strategies.

They register through the ``actsparse`` entry-point group like any third-party
plugin; the functions are also importable for direct use.
"""

from __future__ import annotations

from actsparse.masks._functions import magnitude_mask, mean_over_batch, sum_aggregate

__version__ = "0.1.0"

__all__ = ["__version__", "magnitude_mask", "mean_over_batch", "sum_aggregate"]
