"""Input files of the commands: read only from regular files, and JSON bounded before it is
parsed.

A FIFO, a device or a socket given as an input is refused at once, so that a command never
waits for a writer that does not come, or reads without end. JSON that a command reads (a
recipe, a model directory's ``config.json``) is bounded in size, nesting depth and the length
of its numbers before :func:`json.loads` sees it, so that a hostile file ends in one line,
not in a ``RecursionError`` or in the ``ValueError`` of an integer with thousands of digits.
"""

from __future__ import annotations

import json
import os
import re
import stat
from itertools import accumulate
from typing import Any

from actsparse.cli._app import CommandError

__all__ = ["MAX_JSON_DEPTH", "MAX_NUMBER_CHARS", "JSONBoundError", "parse_json", "read_regular"]

#: How deeply the JSON a command reads may nest (a recipe nests one level).
MAX_JSON_DEPTH = 32
#: How many characters one number of such JSON may have (a float's repr has at most 24).
MAX_NUMBER_CHARS = 64

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
# O_NONBLOCK: opening a FIFO does not wait for a writer (and the fstat below refuses it).
_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_FLAGS |= getattr(os, "O_NONBLOCK", 0)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LONG_NUMBER = re.compile(rf"[-+0-9.eE]{{{MAX_NUMBER_CHARS + 1},}}")


def _refuse_special(mode: int, where: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise CommandError(f"{where} is not a regular file (it is {kind})")


def read_regular(path: os.PathLike[str], where: str, *, limit: int | None = None) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes.

    ``where`` names the file in messages, such as ``"recipe 'r.json'"``.

    Raises:
        CommandError: The file is missing, not a regular file (checked before it is opened,
            and again on the open file), larger than ``limit``, or cannot be read.
    """
    try:
        _refuse_special(os.stat(path).st_mode, where)
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        raise CommandError(f"{where} does not exist") from None
    except OSError as exc:
        raise CommandError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb") as fh:
            status = os.fstat(fh.fileno())
            _refuse_special(status.st_mode, where)
            if limit is not None and status.st_size > limit:
                _too_large(where, status.st_size, limit)
            data = fh.read() if limit is None else fh.read(limit + 1)
    except OSError as exc:
        raise CommandError(f"cannot read {where}: {exc.strerror or exc}") from None
    if limit is not None and len(data) > limit:
        _too_large(where, len(data), limit)  # it grew while it was read
    return data


def _too_large(where: str, size: int, limit: int) -> None:
    raise CommandError(f"{where} is {size:,} bytes, over the limit of {limit:,}")


class JSONBoundError(ValueError):
    """JSON that is not JSON, or that passes a bound; the message completes ``"the file ..."``."""


def parse_json(text: str) -> Any:
    """``json.loads(text)``, once ``text`` is checked to nest at most :data:`MAX_JSON_DEPTH`
    levels and to hold no number longer than :data:`MAX_NUMBER_CHARS` characters.

    Raises:
        JSONBoundError: The text passes a bound, or is not JSON.
    """
    outside = _STRING.sub('""', text)  # brackets and digits inside strings do not count
    brackets = _NOT_BRACKET.sub("", outside)
    if brackets:
        depth = max(accumulate(1 if c in "[{" else -1 for c in brackets))
        if depth > MAX_JSON_DEPTH:
            raise JSONBoundError(f"nests {depth:,} levels deep, over the limit of {MAX_JSON_DEPTH}")
    long = _LONG_NUMBER.search(outside)
    if long is not None:
        raise JSONBoundError(
            f"holds a number {len(long.group()):,} characters long, over the limit of "
            f"{MAX_NUMBER_CHARS}"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONBoundError(f"is not JSON: {exc}") from None
