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

import importlib.metadata

from actsparse.core import STATE_FORMAT_VERSION, ThresholdResult
from actsparse.hooks._allocate import allocate_greedy, layer_sensitivity
from actsparse.hooks._calibrate import CalibrationSummary, calibrate
from actsparse.hooks._execution import KernelWarning
from actsparse.hooks._fold import PrunedConv1d, PrunedConv2d, PrunedConv3d, PrunedLinear
from actsparse.hooks._kernels import (
    KernelStatus,
    KernelUnavailableError,
    cpu_kernel_status,
    measure_crossover,
    sparse_linear,
    to_input_major,
    to_output_major,
)
from actsparse.hooks._patterns import LayerRule
from actsparse.hooks._presets import PRESETS
from actsparse.hooks._sparsifier import ActivationSparsifier, WorkflowWarning
from actsparse.hooks._sparsify import sparsify
from actsparse.hooks._threshold import SparsityTargetWarning

__version__ = importlib.metadata.version("actsparse-hooks")

__all__ = [
    "STATE_FORMAT_VERSION",
    "ActivationSparsifier",
    "CalibrationSummary",
    "KernelStatus",
    "KernelUnavailableError",
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
    "cpu_kernel_status",
    "measure_crossover",
    "sparse_linear",
    "to_input_major",
    "to_output_major",
    "layer_sensitivity",
    "sparsify",
]
