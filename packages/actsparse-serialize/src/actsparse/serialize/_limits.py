"""How much a state file may make the reader allocate.

A file's *elements* are those of every mask (its full shape, whatever its
encoding stores) and of every other tensor it holds. A packed or constant
mask costs a few bytes on disk and its full size in memory once loaded, so
the reader adds up what a file declares and refuses it, before allocating
anything in proportion, when the total passes the cap:
``load(..., max_elements=n)``, else the ``ACTSPARSE_MAX_ELEMENTS``
environment variable, else :data:`DEFAULT_MAX_ELEMENTS`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from actsparse.core import ConfigError, SerializationError

__all__ = [
    "BYTES_PER_ELEMENT",
    "DEFAULT_MAX_ELEMENTS",
    "MAX_ELEMENTS_ENV_VAR",
    "check_elements",
    "element_cap",
    "max_elements",
]

#: The environment variable that sets the cap when ``load`` is not given one.
MAX_ELEMENTS_ENV_VAR = "ACTSPARSE_MAX_ELEMENTS"
#: The cap by default: 2**28 elements, 1 GiB of float32 masks.
DEFAULT_MAX_ELEMENTS = 2**28
#: The widest element a state file may hold (int64, uint64, float64).
BYTES_PER_ELEMENT = 8

_cap: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "actsparse_serialize_max_elements", default=None
)


def _checked(value: object, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source} must be a positive int (a number of elements), got {value!r}")
    return value


def _from_environment() -> int | None:
    raw = os.environ.get(MAX_ELEMENTS_ENV_VAR)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(
            f"{MAX_ELEMENTS_ENV_VAR} (max_elements) must be a positive int, got {raw!r}"
        ) from None
    return _checked(value, f"{MAX_ELEMENTS_ENV_VAR} (max_elements)")


def max_elements(value: int | None = None) -> int:
    """The cap in force: ``value``, else the one ``element_cap`` set, else the environment's."""
    if value is not None:
        return _checked(value, "max_elements")
    current = _cap.get()
    if current is not None:
        return current
    from_env = _from_environment()
    return DEFAULT_MAX_ELEMENTS if from_env is None else from_env


@contextlib.contextmanager
def element_cap(value: int | None) -> Iterator[int]:
    """Resolve the cap once (see :func:`max_elements`) and keep it for the block."""
    cap = max_elements(value)
    token = _cap.set(cap)
    try:
        yield cap
    finally:
        _cap.reset(token)


def check_elements(count: int, cap: int) -> None:
    """Refuse a file that declares more than ``cap`` elements."""
    if count > cap:
        raise SerializationError(
            f"the file declares {count} elements, more than the {cap} allowed; a file that "
            f"you trust can be loaded with load(..., max_elements={count}) or "
            f"{MAX_ELEMENTS_ENV_VAR}={count}"
        )
