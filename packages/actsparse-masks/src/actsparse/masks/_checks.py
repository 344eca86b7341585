"""Value checks of the built-in strategies' ``sparse_config`` keys.

Each ``check_*`` function is a strategy record's ``check``: it receives the
keys that the strategy gets from a layer's ``sparse_config`` and raises
:class:`~actsparse.core.ConfigError` naming the key at fault, so that a bad
value is refused when the layer is registered rather than at ``step()``. The
strategy functions apply the same rules (with the helpers below) when they
are called directly; what depends on the data (``k`` against the size along
``dim``, a ``sample_dims`` entry against the input's rank) is checked there only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from actsparse.core import ConfigError

__all__ = [
    "block_shape",
    "check_block_norm",
    "check_magnitude",
    "check_n_m",
    "check_sample_dims",
    "check_target_threshold",
    "check_threshold",
    "check_topk",
    "fraction",
    "is_int",
    "number",
]


def is_int(value: object) -> bool:
    """Whether ``value`` is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def number(name: str, value: object) -> float:
    """``value`` as a float; a ConfigError naming ``name`` unless it is a real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def fraction(name: str, value: object) -> float:
    """``value`` as a float in [0, 1]; a ConfigError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def block_shape(value: object) -> tuple[int, int]:
    """``sparse_block_shape`` as two positive ints; a ConfigError otherwise."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(is_int(v) and v > 0 for v in value)
    ):
        raise ConfigError(f"sparse_block_shape must be two positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _dim(name: str, value: object, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not is_int(value):
        allowed = "an int or None" if none_ok else "an int"
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def check_magnitude(options: Mapping[str, Any]) -> None:
    """``sparsity_level``: a number in [0, 1]."""
    fraction("sparsity_level", options.get("sparsity_level"))


def check_target_threshold(options: Mapping[str, Any]) -> None:
    """``sparsity_level``: a number in [0, 1]."""
    fraction("sparsity_level", options.get("sparsity_level"))


def check_threshold(options: Mapping[str, Any]) -> None:
    """``threshold``: a number (not NaN)."""
    number("threshold", options.get("threshold"))


def check_topk(options: Mapping[str, Any]) -> None:
    """Exactly one of ``k`` (an int >= 0) and ``fraction`` (in [0, 1]); ``dim`` an int or None.

    Whether ``k`` fits the size along ``dim`` is known only from the data.
    """
    k, share = options.get("k"), options.get("fraction")
    if (k is None) == (share is None):
        raise ConfigError(
            "topk needs exactly one of k and fraction, got "
            + ("neither" if k is None else f"k={k!r} and fraction={share!r}")
        )
    if k is not None and (not is_int(k) or k < 0):
        raise ConfigError(f"k must be an int >= 0, got {k!r}")
    if share is not None:
        fraction("fraction", share)
    _dim("dim", options.get("dim", -1), none_ok=True)


def check_n_m(options: Mapping[str, Any]) -> None:
    """``m`` a positive int, ``n`` an int in [0, m], ``dim`` an int."""
    n: Any = options.get("n")
    m: Any = options.get("m")
    if not is_int(m) or m < 1:
        raise ConfigError(f"m must be a positive int, got {m!r}")
    if not is_int(n) or not 0 <= n <= m:
        raise ConfigError(f"n must be an int in [0, m={m}], got {n!r}")
    _dim("dim", options.get("dim", -1))


def check_block_norm(options: Mapping[str, Any]) -> None:
    """``sparsity_level`` in [0, 1], ``sparse_block_shape`` two positive ints,
    ``zeros_per_block`` an int in [0, entries of a block] or None, ``norm`` ``"L1"`` or ``"L2"``."""
    fraction("sparsity_level", options.get("sparsity_level"))
    height, width = block_shape(options.get("sparse_block_shape", (1, 4)))
    zeros = options.get("zeros_per_block")
    if zeros is not None and (not is_int(zeros) or not 0 <= zeros <= height * width):
        raise ConfigError(
            f"zeros_per_block must be an int in [0, {height * width}] (the entries of a "
            f"block), got {zeros!r}"
        )
    norm = options.get("norm", "L1")
    if norm not in ("L1", "L2"):
        raise ConfigError(f"norm must be 'L1' or 'L2', got {norm!r}")


def check_sample_dims(options: Mapping[str, Any]) -> None:
    """``sample_dims``: None, an int or a list of ints (their range depends on the input)."""
    value = options.get("sample_dims")
    if value is None or is_int(value):
        return
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not all(is_int(d) for d in value)
    ):
        raise ConfigError(f"sample_dims must be an int or a list of ints, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"sample_dims={value!r} names a dimension twice")
