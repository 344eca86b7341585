"""The actsparse error family.

Every error that actsparse raises derives from :class:`ActsparseError`. Each
one also derives from the builtin exception that torch.ao's
``ActivationSparsifier`` raised in the same situation, so ``except`` clauses
written against torch.ao keep working after switching imports.
"""

from __future__ import annotations

__all__ = [
    "ActsparseError",
    "ActsparseWarning",
    "CalibrationWarning",
    "ConfigError",
    "DuplicateStrategyError",
    "LayerNotFoundError",
    "MaskError",
    "MaskNotReadyError",
    "PluginError",
    "SerializationError",
    "StateError",
    "StrategyError",
    "UnknownStrategyError",
]


class ActsparseError(Exception):
    """Base class of every error raised by actsparse."""

    def __str__(self) -> str:
        # KeyError quotes its message; keep messages readable for every subclass.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(ActsparseError, ValueError, AssertionError):
    """A layer or strategy configuration is invalid.

    torch.ao raised ``AssertionError`` for these (features without
    ``feature_dim``, a function that is not callable).
    """


class LayerNotFoundError(ActsparseError, ValueError, KeyError, AssertionError):
    """A layer is not part of the model, or not registered.

    torch.ao raised ``AssertionError`` (``register_layer``,
    ``load_state_dict``), ``ValueError`` (``get_mask``) or ``KeyError``
    (``unregister_layer``) for these.
    """


class MaskNotReadyError(ActsparseError, ValueError):
    """A layer has no mask yet: it has not seen an input since registration."""


class StateError(ActsparseError, RuntimeError, KeyError):
    """A call does not fit the layer's place in the workflow.

    For example ``step()`` before any forward pass (torch.ao raised
    ``KeyError``), or ``squash_mask()`` twice.
    """


class StrategyError(ActsparseError, RuntimeError):
    """A strategy raised while a hook ran it during a forward pass.

    The message names the layer and the strategy; the strategy's own exception
    is chained as ``__cause__``. torch.ao let the strategy's exception through
    unchanged; most of those (torch's own) are ``RuntimeError``.
    """


class MaskError(ActsparseError, ValueError):
    """A mask function returned something that is not a usable mask."""


class UnknownStrategyError(ActsparseError, ValueError, KeyError, AssertionError):
    """A strategy or serializer name that no installed plugin registers.

    torch.ao raised ``AssertionError`` for a function that was not callable.
    """


class DuplicateStrategyError(ActsparseError, ValueError):
    """Two plugins register a strategy or serializer under the same name."""


class PluginError(ActsparseError, RuntimeError):
    """A plugin could not be loaded or returned something invalid."""


class SerializationError(ActsparseError, ValueError):
    """State could not be converted, written or read."""


class ActsparseWarning(UserWarning):
    """Base class of actsparse's warnings: :class:`CalibrationWarning`,
    ``PluginWarning``, and ``actsparse.hooks``' ``SparsityTargetWarning``,
    ``WorkflowWarning`` and ``KernelWarning``.

    ``warnings.simplefilter("error", ActsparseWarning)`` turns them into
    errors; each subclass names one situation.
    """


class CalibrationWarning(ActsparseWarning):
    """Calibration left values out: NaN or inf among a layer's inputs.

    The message names each layer and how many values were skipped; the
    statistics come from the finite values alone.
    """
