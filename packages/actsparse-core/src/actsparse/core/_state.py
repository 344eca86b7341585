"""The sparsifier state dict: its layout, its records and its one validator.

Every package that writes or reads a state dict asks this module: the runtime
builds one with :meth:`StateDict.as_dict` and restores one from
:func:`parse_state_dict`; the file formats validate what they decode with the
same function; the command line describes what it returns.

The layout keeps torch.ao's keys and adds a version::

    {
        "state": {name: {"mask": mask, "threshold": {...}, "offset": offset}},
        "data_groups": {name: {<CONFIG_KEYS>, "hook_state": ..., "data": ...}},
        "defaults": {<CONFIG_KEYS>},
        "format_version": 1,
    }

``threshold`` is present in threshold mode after ``step()``; ``offset``, when
the threshold strategy compensates its zeros, holds one number per input
feature: the mean of the values the threshold zeroes, whose contribution the
layer adds back to its output. A mask is ``None``, a tensor, or (for a layer
registered with ``features``) a list holding one tensor per feature;
:meth:`StateDict.as_dict` writes them as sparse COO tensors, as torch.ao does,
and :func:`parse_state_dict` makes them dense again. A ``data`` entry is
present while aggregated data exists.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from actsparse.core._errors import ConfigError, SerializationError
from actsparse.core._protocols import Mask

__all__ = [
    "AGGREGATE",
    "AGGREGATE_FN_KEY",
    "CONFIG_KEYS",
    "DATA_GROUP_KEYS",
    "DATA_KEY",
    "DETACHED",
    "FORMAT_VERSION_KEY",
    "FEATURES_KEY",
    "FEATURE_DIM_KEY",
    "HOOK_KEY",
    "HOOK_STATES",
    "HOOK_STATE_KEY",
    "LAYER_KEY",
    "LAYER_KEYS",
    "MASK_FN_KEY",
    "MASK_KEY",
    "OFFSET_KEY",
    "REDUCE_FN_KEY",
    "SPARSE_CONFIG_KEY",
    "SPARSIFY",
    "STATE_FORMAT_VERSION",
    "SPARSITY_TOLERANCE",
    "STATE_KEYS",
    "STRATEGY_KEYS",
    "THRESHOLD_KEY",
    "LayerState",
    "StateDict",
    "ThresholdResult",
    "check_offset",
    "checked_sparse_coo",
    "convert_masks",
    "make_config",
    "mask_to_dense",
    "mask_to_sparse",
    "merge_config",
    "parse_state_dict",
]

#: The top-level keys of torch.ao's state dict, which actsparse keeps.
STATE_KEYS = ("state", "data_groups", "defaults")
#: The key of the layout's version, which ``state_dict()`` adds to torch.ao's keys.
FORMAT_VERSION_KEY = "format_version"
#: The version of the layout that this actsparse writes and reads.
STATE_FORMAT_VERSION = 1

#: The configuration key of a layer's aggregate strategy.
AGGREGATE_FN_KEY = "aggregate_fn"
#: The configuration key of a layer's reduce strategy.
REDUCE_FN_KEY = "reduce_fn"
#: The configuration key of a layer's mask strategy.
MASK_FN_KEY = "mask_fn"
#: The configuration key of a layer's selected features.
FEATURES_KEY = "features"
#: The configuration key of the dimension that ``features`` index.
FEATURE_DIM_KEY = "feature_dim"
#: The configuration key of the options of a layer's strategies.
SPARSE_CONFIG_KEY = "sparse_config"
#: The configuration keys that ``register_layer`` takes as arguments of their own; every
#: other keyword argument is a ``sparse_config`` key.
LAYER_KEYS = (AGGREGATE_FN_KEY, REDUCE_FN_KEY, MASK_FN_KEY, FEATURES_KEY, FEATURE_DIM_KEY)
#: The keys a layer's configuration holds (and ``defaults`` holds).
CONFIG_KEYS = (*LAYER_KEYS, SPARSE_CONFIG_KEY)
#: The configuration keys that hold strategies, and the registry kind of each.
STRATEGY_KEYS: Mapping[str, str] = {
    AGGREGATE_FN_KEY: "aggregate",
    REDUCE_FN_KEY: "reduce",
    MASK_FN_KEY: "mask",
}
#: A data group's key for the registered module (at run time only).
LAYER_KEY = "layer"
#: A data group's key for the attached hook's handle (at run time only).
HOOK_KEY = "hook"
#: A data group's key for which hook is attached.
HOOK_STATE_KEY = "hook_state"
#: A data group's key for the aggregated data, present while there is some.
DATA_KEY = "data"
#: The keys every data group holds at run time.
DATA_GROUP_KEYS = (*CONFIG_KEYS, LAYER_KEY, HOOK_STATE_KEY)
#: A layer state's key for its mask.
MASK_KEY = "mask"
#: A layer state's key for its threshold (threshold mode, after ``step()``).
THRESHOLD_KEY = "threshold"
#: A layer state's key for the offset that compensates a threshold's zeros.
OFFSET_KEY = "offset"

#: ``hook_state`` while the layer's inputs are aggregated.
AGGREGATE = "aggregate"
#: ``hook_state`` once ``squash_mask()`` attached the hook that applies the mask.
SPARSIFY = "sparsify"
#: ``hook_state`` once ``squash_mask(attach_sparsify_hook=False)`` removed every hook.
DETACHED = "None"
#: The values of ``hook_state``: which hook is attached.
HOOK_STATES = (AGGREGATE, SPARSIFY, DETACHED)

#: The largest float32: a threshold or offset beyond it cannot be applied to a float32
#: layer (torch refuses to convert the threshold; the offset would become inf).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

#: How far a threshold's expected sparsity may lie from its target (one point) for the
#: target to count as reached.
SPARSITY_TOLERANCE = 0.01


def make_config(
    aggregate_fn: Any = None,
    reduce_fn: Any = None,
    mask_fn: Any = None,
    features: Any = None,
    feature_dim: Any = None,
    sparse_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A configuration, one entry per :data:`CONFIG_KEYS` (the sparsifier's ``defaults``)."""
    return {
        AGGREGATE_FN_KEY: aggregate_fn,
        REDUCE_FN_KEY: reduce_fn,
        MASK_FN_KEY: mask_fn,
        FEATURES_KEY: features,
        FEATURE_DIM_KEY: feature_dim,
        SPARSE_CONFIG_KEY: dict(sparse_config or {}),
    }


def merge_config(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A layer's configuration: a deep copy of ``defaults`` overridden as ``register_layer``
    overrides it.

    The :data:`LAYER_KEYS` in ``overrides`` that are not None replace the
    defaults; every other key updates ``sparse_config``.
    """
    config = copy.deepcopy(dict(defaults))
    for key, value in overrides.items():
        if key in LAYER_KEYS:
            if value is not None:
                config[key] = copy.deepcopy(value)
        else:
            config[SPARSE_CONFIG_KEY][key] = copy.deepcopy(value)
    return config


def _fraction(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ConfigError(f"ThresholdResult.{attribute.name} must be in [0, 1], got {value!r}")


def _threshold(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"ThresholdResult.threshold must be a finite number >= 0, got {value!r}")
    if number > FLOAT32_MAX:
        raise ConfigError(
            f"ThresholdResult.threshold must be at most {FLOAT32_MAX!r}, the largest float32, "
            f"got {value!r}: a float32 layer cannot apply it"
        )


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"ThresholdResult.{name} must be a number, got {value!r}")
    return float(value)


def _threshold_number(value: object) -> float:
    return _number("threshold", value)


def _target_number(value: object) -> float:
    return _number("target", value)


def _expected_number(value: object) -> float:
    return _number("expected_sparsity", value)


def _zero_number(value: object) -> float:
    return _number("zero_fraction", value)


@attrs.frozen
class ThresholdResult:
    """What ``step()`` computed for a threshold-mode layer.

    Attributes:
        threshold: Entries with ``|x| <= threshold`` are zeroed.
        target: The sparsity level asked for.
        expected_sparsity: The fraction of the calibration positions that the
            threshold zeroes (equal to ``target`` unless it is unreachable).
        zero_fraction: The fraction of calibration positions that were zero
            (below the histogram's lowest edge) already.
    """

    #: How far ``expected_sparsity`` may lie from ``target`` for :attr:`reachable`.
    tolerance = SPARSITY_TOLERANCE

    threshold: float = attrs.field(converter=_threshold_number, validator=_threshold)
    target: float = attrs.field(converter=_target_number, validator=_fraction)
    expected_sparsity: float = attrs.field(converter=_expected_number, validator=_fraction)
    zero_fraction: float = attrs.field(converter=_zero_number, validator=_fraction)

    @property
    def reachable(self) -> bool:
        """False when no threshold meets the target: the zeros alone exceed it by more
        than a point (:data:`SPARSITY_TOLERANCE`; the layer overshoots it), or the
        expected sparsity lies more than a point from it, because equal values
        (ties) fill the histogram bin that holds the target."""
        if self.zeros_exceed_target:
            return False
        return abs(self.expected_sparsity - self.target) <= self.tolerance + 1e-9

    @property
    def zeros_exceed_target(self) -> bool:
        """Whether the inputs' zeros alone exceed the target by more than a point."""
        return self.zero_fraction > self.target + self.tolerance + 1e-9

    def to_dict(self) -> dict[str, float]:
        """The four fields as a plain dict, as a state dict stores them."""
        return attrs.asdict(self)


@attrs.frozen(eq=False)
class LayerState:
    """One layer of a state dict, checked: its configuration, hook state, mask and data.

    Attributes:
        config: The layer's configuration, one entry per :data:`CONFIG_KEYS`.
        hook_state: One of :data:`HOOK_STATES`.
        mask: ``None``, a dense tensor, or a list of dense tensors (one per feature).
        threshold: The threshold of a threshold-mode layer after ``step()``.
        data: The aggregated data, or ``None`` when there is none.
        offset: With a threshold that compensates its zeros: a 1-D float
            tensor, per input feature the mean of the values it zeroes.
    """

    config: Mapping[str, Any]
    hook_state: str
    mask: Mask | None = None
    threshold: ThresholdResult | None = None
    data: Any = None
    offset: torch.Tensor | None = None

    def entries(self, *, sparse: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(state entry, data group)`` as the state dict holds them; masks COO if ``sparse``."""
        convert = _to_sparse if sparse else _to_dense
        state: dict[str, Any] = {MASK_KEY: _map_mask(self.mask, convert)}
        if self.threshold is not None:
            state[THRESHOLD_KEY] = self.threshold.to_dict()
        if self.offset is not None:
            state[OFFSET_KEY] = self.offset
        group = {key: self.config[key] for key in CONFIG_KEYS}
        group[HOOK_STATE_KEY] = self.hook_state
        if self.data is not None:
            group[DATA_KEY] = self.data
        return state, group


@attrs.frozen(eq=False)
class StateDict:
    """A whole state dict, checked: the defaults and every layer, in order.

    ``format_version`` is None for a state dict that had none (torch.ao's).
    """

    defaults: Mapping[str, Any]
    layers: Mapping[str, LayerState]
    format_version: int | None = STATE_FORMAT_VERSION

    def as_dict(self, *, sparse: bool = True) -> dict[str, Any]:
        """The state dict's layout; masks as sparse COO tensors unless ``sparse`` is False."""
        state: dict[str, Any] = {}
        groups: dict[str, Any] = {}
        for name, layer in self.layers.items():
            state[name], groups[name] = layer.entries(sparse=sparse)
        out: dict[str, Any] = {
            "state": state,
            "data_groups": groups,
            "defaults": dict(self.defaults),
        }
        if self.format_version is not None:
            out[FORMAT_VERSION_KEY] = self.format_version
        return out


def _to_sparse(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.is_sparse else mask.to_sparse_coo()  # type: ignore[no-untyped-call]


def checked_sparse_coo(mask: torch.Tensor, where: str = "mask") -> torch.Tensor:
    """``mask`` (a sparse COO tensor) rebuilt from its raw indices and values once they pass.

    A sparse tensor built with ``check_invariants=False``, or read by
    ``torch.load`` (which does not check them by default), may hold indices
    outside its shape; ``to_dense()`` and other kernels then read and write
    out of bounds, silently or with a segfault. Nothing here touches the
    values before the indices are checked. The result is marked uncoalesced,
    whatever the original claimed, so duplicate indices are summed as torch
    defines.

    Raises:
        SerializationError: The indices are malformed or out of range (``where`` names it).
    """
    indices = mask._indices()
    values = mask._values()
    if (
        indices.dtype != torch.int64
        or indices.dim() != 2
        or indices.shape[0] != mask.sparse_dim()
        or values.shape[:1] != indices.shape[1:]
        or values.shape[1:] != mask.shape[mask.sparse_dim() :]
    ):
        raise SerializationError(
            f"{where}: a malformed sparse COO tensor: indices {tuple(indices.shape)} of "
            f"{indices.dtype}, values {tuple(values.shape)}, shape {tuple(mask.shape)}"
        )
    if indices.numel():
        low = indices.amin(dim=1)
        high = indices.amax(dim=1)
        bounds = torch.tensor(mask.shape[: mask.sparse_dim()], dtype=torch.int64)
        outside = (low < 0) | (high >= bounds.to(high.device))
        if bool(outside.any()):
            dim = int(torch.nonzero(outside)[0])
            raise SerializationError(
                f"{where}: sparse COO indices out of range: dimension {dim} has size "
                f"{int(bounds[dim])}, the indices span [{int(low[dim])}, {int(high[dim])}]"
            )
    return torch.sparse_coo_tensor(indices, values, mask.shape, check_invariants=True)


def _to_dense(mask: torch.Tensor, where: str = "mask") -> torch.Tensor:
    if mask.layout == torch.sparse_coo:
        return checked_sparse_coo(mask, where).to_dense()
    return mask


def _map_mask(mask: Mask | None, convert: Callable[[torch.Tensor], torch.Tensor]) -> Mask | None:
    if isinstance(mask, list):
        return [convert(m) for m in mask]
    return None if mask is None else convert(mask)


def mask_to_sparse(mask: torch.Tensor, *, where: str = "mask") -> torch.Tensor:
    """A dense mask as a sparse COO tensor (a sparse one is checked and returned as is)."""
    if mask.is_sparse:
        checked_sparse_coo(mask, where)
        return mask
    return _to_sparse(mask)


def mask_to_dense(mask: torch.Tensor, *, where: str = "mask") -> torch.Tensor:
    """A sparse COO mask as a dense tensor, its indices checked first (a dense one as is).

    Raises:
        SerializationError: The sparse tensor's indices are malformed or outside its shape.
    """
    return _to_dense(mask, where)


def convert_masks(state_dict: object, *, sparse: bool) -> dict[str, Any]:
    """A shallow copy of ``state_dict`` whose masks (under ``"state"``) are COO or dense.

    Only the masks are touched; the rest is checked by :func:`parse_state_dict`.
    """
    sd = _mapping(state_dict, "a sparsifier state dict")
    missing = [key for key in STATE_KEYS if key not in sd]
    if missing:
        raise SerializationError(f"the state dict lacks the key(s) {', '.join(map(repr, missing))}")
    state = _mapping(sd["state"], "state_dict['state']")
    convert = mask_to_sparse if sparse else mask_to_dense
    out: dict[Any, Any] = {}
    for name, entry in state.items():
        if not isinstance(entry, Mapping) or MASK_KEY not in entry:
            raise SerializationError(
                f"state[{name!r}] must be a mapping with a 'mask' key, got {entry!r}"
            )
        mask = entry[MASK_KEY]
        if not (
            mask is None
            or isinstance(mask, torch.Tensor)
            or (isinstance(mask, (list, tuple)) and all(isinstance(m, torch.Tensor) for m in mask))
        ):
            raise SerializationError(
                f"state[{name!r}]['mask'] must be None, a tensor or a list of tensors, "
                f"got {type(mask).__name__}"
            )
        where = f"state[{name!r}]['mask']"
        if isinstance(mask, (list, tuple)):
            out[name] = {
                **entry,
                MASK_KEY: [convert(m, where=f"{where}[{i}]") for i, m in enumerate(mask)],
            }
        else:
            out[name] = {**entry, MASK_KEY: None if mask is None else convert(mask, where=where)}
    return {**sd, "state": out}


# ------------------------------------------------------------------ the validator


def _mapping(value: object, where: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise SerializationError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _layer_names(mapping: Mapping[Any, Any], where: str) -> None:
    bad = [name for name in mapping if not isinstance(name, str)]
    if bad:
        raise SerializationError(
            f"{where} must map layer names (strings) to entries, got the key {bad[0]!r}"
        )


def _config(value: object, where: str, *, names_only: bool) -> dict[str, Any]:
    config = _mapping(value, where)
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise SerializationError(f"{where} lacks the key(s) {', '.join(map(repr, missing))}")
    for key in STRATEGY_KEYS:
        strategy = config[key]
        if strategy is None or isinstance(strategy, str):
            continue
        if names_only or not callable(strategy):
            raise SerializationError(
                f"{where}[{key!r}] must be a strategy name or None"
                + ("" if names_only else " or a callable")
                + f", got {type(strategy).__name__}"
            )
    if not isinstance(config[SPARSE_CONFIG_KEY], Mapping):
        raise SerializationError(f"{where}['sparse_config'] must be a mapping")
    return {key: config[key] for key in CONFIG_KEYS}


def _mask(value: object, features: object, where: str) -> Mask | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        parts: list[object] = [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise SerializationError(
            f"{where} must be None, a tensor or a list of tensors, got {type(value).__name__}"
        )
    for position, part in enumerate(parts):
        label = where if isinstance(value, torch.Tensor) else f"{where}[{position}]"
        if not isinstance(part, torch.Tensor):
            raise SerializationError(f"{label} must be a tensor, got {type(part).__name__}")
        if part.layout not in (torch.strided, torch.sparse_coo):
            raise SerializationError(
                f"{label} is a {part.layout} tensor; masks are dense or sparse COO"
            )
    if features is not None:
        if isinstance(value, torch.Tensor):
            raise SerializationError(
                f"{where} must be a list with one tensor per feature (the layer has features)"
            )
        count = len(features) if isinstance(features, (list, tuple)) else None
        if count is not None and count != len(parts):
            raise SerializationError(
                f"{where} must be a list with one tensor per feature: it holds {len(parts)}, "
                f"the layer has {count} feature(s)"
            )
    elif not isinstance(value, torch.Tensor):
        raise SerializationError(f"{where} must be a tensor (the layer has no features)")
    if isinstance(value, torch.Tensor):
        return _to_dense(value, where)
    return [
        _to_dense(part, f"{where}[{i}]")  # type: ignore[arg-type]
        for i, part in enumerate(parts)
    ]


_THRESHOLD_FIELDS = frozenset(f.name for f in attrs.fields(ThresholdResult))


def _threshold_of(value: object, where: str) -> ThresholdResult | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != _THRESHOLD_FIELDS:
        raise SerializationError(
            f"{where} must be a mapping with exactly the keys "
            f"{', '.join(sorted(_THRESHOLD_FIELDS))}"
        )
    try:
        return ThresholdResult(**value)
    except (ConfigError, TypeError, ValueError) as exc:
        raise SerializationError(f"{where} is invalid: {exc}") from None


def check_offset(value: object, where: str) -> torch.Tensor:
    """``value`` if it is a non-empty 1-D dense floating tensor of finite numbers that
    float32 holds (``|v| <= FLOAT32_MAX``).

    Raises:
        SerializationError: It is not (``where`` names it).
    """
    if (
        not isinstance(value, torch.Tensor)
        or value.layout != torch.strided
        or value.ndim != 1
        or value.numel() == 0
        or not value.is_floating_point()
    ):
        shown = (
            f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise SerializationError(
            f"{where} must be a non-empty 1-D dense floating tensor (one number per input "
            f"feature), got {shown}"
        )
    if not bool(torch.isfinite(value).all()):
        raise SerializationError(f"{where} holds non-finite numbers")
    if value.dtype.itemsize > 4 and bool((value.abs() > FLOAT32_MAX).any()):
        raise SerializationError(
            f"{where} holds numbers beyond float32's range (|v| > {FLOAT32_MAX!r}); a float32 "
            "layer would add inf to its output"
        )
    return value


def _offset_of(value: object, threshold: ThresholdResult | None, where: str) -> Any:
    if value is None:
        return None
    if threshold is None:
        raise SerializationError(f"{where} needs a threshold: only a threshold has an offset")
    return check_offset(value, where).clone()


def parse_state_dict(state_dict: object, *, names_only: bool = False) -> StateDict:
    """Check a state dict and return it as records, with dense masks; the one validator.

    It accepts what ``state_dict()`` returns (actsparse's, or torch.ao's,
    which lacks ``format_version``) and what the file formats decode. It
    checks everything that does not need a model: the keys, the layer names,
    each configuration and hook state, the masks' structure and sparse
    indices, and the thresholds. The configurations and data are deep-copied,
    so the records share nothing mutable with ``state_dict``.

    Args:
        state_dict: The mapping to check.
        names_only: Refuse callables where strategies are named (a file holds
            names, never code).

    Raises:
        SerializationError: Naming the key that is wrong.
    """
    sd = _mapping(state_dict, "a sparsifier state dict")
    missing = [key for key in STATE_KEYS if key not in sd]
    if missing:
        raise SerializationError(f"the state dict lacks the key(s) {', '.join(map(repr, missing))}")
    version = sd.get(FORMAT_VERSION_KEY)
    if version is not None and (version != STATE_FORMAT_VERSION or isinstance(version, bool)):
        raise SerializationError(
            f"unknown state format_version {version!r}: this actsparse reads "
            f"{STATE_FORMAT_VERSION}; a newer state needs a newer actsparse"
        )
    state = _mapping(sd["state"], "state_dict['state']")
    groups = _mapping(sd["data_groups"], "state_dict['data_groups']")
    _layer_names(state, "state_dict['state']")
    _layer_names(groups, "state_dict['data_groups']")
    defaults = sd["defaults"]
    if not isinstance(defaults, Mapping) or set(defaults) != set(CONFIG_KEYS):
        raise SerializationError(
            f"state_dict['defaults'] must hold exactly the keys {', '.join(CONFIG_KEYS)}"
        )
    defaults = _config(defaults, "state_dict['defaults']", names_only=names_only)
    extra = sorted(set(state) - set(groups))
    if extra:
        raise SerializationError(
            f"state_dict['state'] names layers without a data group: {', '.join(extra)}"
        )
    layers: dict[str, LayerState] = {}
    for name, raw_group in groups.items():
        where = f"data_groups[{name!r}]"
        group = _mapping(raw_group, where)
        if HOOK_STATE_KEY not in group:
            raise SerializationError(f"{where} lacks the key 'hook_state'")
        config = _config(group, where, names_only=names_only)
        hook_state = group[HOOK_STATE_KEY]
        if not isinstance(hook_state, str) or hook_state not in HOOK_STATES:
            raise SerializationError(
                f"{where}['hook_state'] must be one of {HOOK_STATES}, got {hook_state!r}"
            )
        entry = _mapping(state.get(name, {}), f"state[{name!r}]")
        mask = _mask(entry.get(MASK_KEY), config[FEATURES_KEY], f"state[{name!r}]['mask']")
        threshold = _threshold_of(entry.get(THRESHOLD_KEY), f"state[{name!r}]['threshold']")
        if threshold is not None and mask is not None:
            raise SerializationError(
                f"state[{name!r}] holds both a mask and a threshold; a layer has one or the other"
            )
        offset = _offset_of(entry.get(OFFSET_KEY), threshold, f"state[{name!r}]['offset']")
        layers[name] = LayerState(
            config=copy.deepcopy(config),
            hook_state=hook_state,
            mask=mask,
            threshold=threshold,
            data=copy.deepcopy(group.get(DATA_KEY)),
            offset=offset,
        )
    return StateDict(defaults=copy.deepcopy(defaults), layers=layers, format_version=version)
