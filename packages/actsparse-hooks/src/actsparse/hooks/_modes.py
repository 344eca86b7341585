"""How a registered layer turns its aggregated data into sparsity, and applies it.

A :class:`~actsparse.hooks._layer.Layer` owns its module, features and
accumulator; everything that depends on the kind of sparsity is delegated to
its masking mode, an object with the small interface below. The runtime
ships three implementations:

* :class:`~actsparse.hooks._static.StaticMask`: ``step()`` computes a {0, 1}
  mask, and the layer's input is multiplied by it (torch.ao's behaviour);
* :class:`~actsparse.hooks._threshold.Threshold`: ``step()`` computes one
  threshold, and the entries of each input whose score (``|x|``, or
  ``|x| * scale`` with a weight-aware strategy) is at or below it are zeroed
  before the layer runs; a compensating strategy also gives an offset whose
  contribution is added to the layer's output;
* :class:`~actsparse.hooks._threshold.KernelThreshold`: the same threshold,
  applied by a registered kernel that computes the layer itself and skips
  the zeroed inputs.

A mode keeps its own state (the mask, the threshold, the statistics to
retarget from); nothing outside reads its private attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from actsparse.core import LayerState, Mask, ThresholdResult

if TYPE_CHECKING:
    from actsparse.hooks._layer import Layer

__all__ = ["Handle", "MaskingMode", "PreHook"]

#: A forward pre-hook: ``hook(module, args)`` returns new args or None.
PreHook = Callable[[nn.Module, tuple[Any, ...]], Any]


class Handle(Protocol):
    """What attaching a hook returns: something that detaches it again."""

    def remove(self) -> None: ...


class MaskingMode(Protocol):
    """The interface between a layer and the way it applies sparsity."""

    #: ``"static"`` or ``"threshold"``: what ``step()`` produces.
    kind: str

    @property
    def mask(self) -> Mask | None:
        """The static mask (a tensor or a list per feature), or None."""

    @property
    def threshold(self) -> ThresholdResult | None:
        """The threshold that ``step()`` computed, or None."""

    @property
    def offset(self) -> torch.Tensor | None:
        """Per input feature, the mean of the values a compensating threshold zeroes
        (its contribution is added back to the layer's output), or None."""

    @property
    def ready(self) -> bool:
        """Whether ``squash_mask()`` can apply the mode (``step()`` has run, or a state
        was restored)."""

    def aggregate_hook(self, layer: Layer) -> PreHook:
        """The pre-hook that folds each input into ``layer.data`` while calibrating."""

    def sparsify(self, layer: Layer) -> Handle:
        """Attach what applies the sparsity to ``layer.module``; return its handle."""

    def compute(self, layer: Layer, data: Any) -> Any:
        """What ``step()`` will store, from ``data``; checked, and nothing is changed."""

    def store(self, computed: Any) -> None:
        """Keep what :meth:`compute` returned."""

    def restore(self, layer: Layer, state: LayerState) -> None:
        """Take a mask or threshold from a checked state record; raise
        ``SerializationError`` if it does not fit the layer."""
