"""actsparse.hooks: the hook-based torch runtime.

:class:`ActivationSparsifier` is a drop-in replacement for
``torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier.ActivationSparsifier``;
:func:`calibrate` runs a model over calibration batches, with a progress bar
and a step count or time budget; :func:`sparsify` does threshold mode in one
call, from calibration batches to a squashed sparsifier. This distribution
holds the runtime only: the ``actsparse`` command line and its demo come with
``actsparse-cli``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import Any

from actsparse.core import STATE_FORMAT_VERSION, ThresholdResult
from actsparse.hooks._allocate import allocate_greedy, layer_sensitivity, linearized_sensitivity
from actsparse.hooks._calibrate import CalibrationSummary, calibrate
from actsparse.hooks._execution import KernelWarning, check_kernel_name
from actsparse.hooks._fold import PrunedConv1d, PrunedConv2d, PrunedConv3d, PrunedLinear
from actsparse.hooks._patterns import LayerRule
from actsparse.hooks._presets import PRESETS
from actsparse.hooks._sparsifier import ActivationSparsifier, WorkflowWarning
from actsparse.hooks._sparsify import ALLOCATIONS, sparsify
from actsparse.hooks._threshold import SparsityTargetWarning

__version__ = importlib.metadata.version("actsparse-hooks")

__all__ = [
    "ALLOCATIONS",
    "STATE_FORMAT_VERSION",
    "ActivationSparsifier",
    "CalibrationSummary",
    "KernelWarning",
    "PRESETS",
    "LayerRule",
    "PrunedConv1d",
    "PrunedConv2d",
    "PrunedConv3d",
    "PrunedLinear",
    "SparsityTargetWarning",
    "ThresholdResult",
    "WorkflowWarning",
    "__version__",
    "allocate_greedy",
    "calibrate",
    "check_kernel_name",
    "layer_sensitivity",
    "linearized_sensitivity",
    "sparsify",
]

#: Names that moved to actsparse.kernels; they resolve here, with a DeprecationWarning,
#: for one release.
MOVED_TO_KERNELS = frozenset(
    {
        "KernelStatus",
        "KernelUnavailableError",
        "cpu_kernel_status",
        "measure_crossover",
        "sparse_linear",
        "to_input_major",
        "to_output_major",
    }
)


def __getattr__(name: str) -> Any:
    if name not in MOVED_TO_KERNELS:
        raise AttributeError(f"module 'actsparse.hooks' has no attribute {name!r}")
    try:
        kernels = importlib.import_module("actsparse.kernels")
    except ImportError as exc:
        raise ImportError(
            f"actsparse.hooks.{name} moved to actsparse.kernels, which is not installed: "
            "pip install actsparse-kernels (or actsparse-hooks[kernels])",
            name="actsparse.kernels",
        ) from exc
    warnings.warn(
        f"actsparse.hooks.{name} moved: import it with `from actsparse.kernels import {name}`; "
        "the old name goes away in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(kernels, name)
