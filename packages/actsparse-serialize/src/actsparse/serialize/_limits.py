"""How much a state file may make the reader allocate.

A file's *elements* are those of every mask (its full shape, whatever its
encoding stores) and of every other tensor it holds. A packed or constant
mask costs a few bytes on disk and its full size in memory once loaded, so
the reader adds up what a file declares and refuses it, before allocating
anything in proportion, when the total passes the cap:
``load(..., max_elements=n)``, else the ``ACTSPARSE_MAX_ELEMENTS``
environment variable, else a cap from the file's own size: at most
:data:`ELEMENTS_PER_FILE_BYTE` elements for each byte of the file (what
bit-packing stores), at least :data:`MIN_FILE_ELEMENTS`, and never more than
:data:`DEFAULT_MAX_ELEMENTS`. A file of 1 KB therefore cannot make the reader
allocate gigabytes (only run-length, sparse-index and constant masks store
fewer bits than they hold), while every file whose masks are bit-packed or
dense, and every file of up to 2**23 elements, is within its cap.
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
    "ELEMENTS_PER_FILE_BYTE",
    "MAX_ELEMENTS_ENV_VAR",
    "MIN_FILE_ELEMENTS",
    "MIN_PICKLE_BYTES",
    "check_elements",
    "element_cap",
    "explicit_cap",
    "file_cap",
    "trust_remedy",
]

#: The environment variable that sets the cap when ``load`` is not given one.
MAX_ELEMENTS_ENV_VAR = "ACTSPARSE_MAX_ELEMENTS"
#: The cap by default for a large file: 2**28 elements, 1 GiB of float32 masks.
DEFAULT_MAX_ELEMENTS = 2**28
#: With no cap given, a file may declare this many elements per byte of its size.
ELEMENTS_PER_FILE_BYTE = 8
#: With no cap given, a file may declare this many elements whatever its size.
MIN_FILE_ELEMENTS = 2**23
#: With no cap given, the pickled state of a ``torch`` file may take this many bytes
#: whatever the file's size (and as many as the file holds, up to 16 MiB).
MIN_PICKLE_BYTES = 2**20
#: The widest element a state file may hold (int64, uint64, float64).
BYTES_PER_ELEMENT = 8

# (resolved, explicit cap): inside ``element_cap`` the cap the caller or the
# environment gave, or None when neither did (the file's size decides).
_cap: contextvars.ContextVar[tuple[bool, int | None]] = contextvars.ContextVar(
    "actsparse_serialize_max_elements", default=(False, None)
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


def explicit_cap(value: int | None = None) -> int | None:
    """The cap that someone set: ``value``, else the one ``element_cap`` resolved, else the
    environment's; None when nobody set one."""
    if value is not None:
        return _checked(value, "max_elements")
    resolved, current = _cap.get()
    if resolved:
        return current
    return _from_environment()


def file_cap(size: int) -> int:
    """The cap in force for a file of ``size`` bytes (see the module's docstring)."""
    cap = explicit_cap()
    if cap is not None:
        return cap
    return min(DEFAULT_MAX_ELEMENTS, max(MIN_FILE_ELEMENTS, ELEMENTS_PER_FILE_BYTE * size))


@contextlib.contextmanager
def element_cap(value: int | None) -> Iterator[int | None]:
    """Resolve the cap once (see :func:`explicit_cap`) and keep it for the block."""
    cap = explicit_cap(value)
    token = _cap.set((True, cap))
    try:
        yield cap
    finally:
        _cap.reset(token)


def trust_remedy(count: int) -> str:
    """How to load a file that you trust with a cap of ``count`` elements."""
    return (
        f"a file that you trust can be loaded with load(..., max_elements={count}) or "
        f"{MAX_ELEMENTS_ENV_VAR}={count}"
    )


def _cap_reason(size: int) -> str:
    """Why the cap for a file of ``size`` bytes is what it is, as a message says it: empty
    unless the file's size sets it."""
    if explicit_cap() is not None or file_cap(size) == DEFAULT_MAX_ELEMENTS:
        return ""
    return (
        f" for a file of {size} bytes ({ELEMENTS_PER_FILE_BYTE} per byte of the file, and at "
        f"least {MIN_FILE_ELEMENTS}, unless max_elements is set)"
    )


def check_elements(count: int, size: int) -> None:
    """Refuse a file of ``size`` bytes that declares more elements than its cap allows."""
    cap = file_cap(size)
    if count > cap:
        raise SerializationError(
            f"the file declares {count} elements, more than the {cap} allowed"
            f"{_cap_reason(size)}; " + trust_remedy(count)
        )
