"""Output paths of the text commands: refused before any work if they cannot be written,
and written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from actsparse.cli._app import CommandError

__all__ = ["check_dir", "check_file", "write_atomic", "written_together"]


def _writable_dir(directory: Path, path: Path, what: str) -> None:
    if not directory.exists():
        raise CommandError(f"cannot write {what} {str(path)!r}: {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise CommandError(
            f"cannot write {what} {str(path)!r}: {str(directory)!r} is not a directory"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CommandError(
            f"cannot write {what} {str(path)!r}: no permission to write in {str(directory)!r}"
        )


def check_file(path: Path, what: str) -> None:
    """Refuse a file that cannot be written: a directory, or one in a missing or read-only
    directory."""
    if path.is_dir():
        raise CommandError(f"cannot write {what} {str(path)!r}: it is a directory")
    _writable_dir(path.parent, path, what)


def check_dir(path: Path, what: str) -> None:
    """Refuse an output directory that exists as something else, or cannot be created."""
    if path.exists():
        if not path.is_dir():
            raise CommandError(
                f"cannot write {what} to {str(path)!r}: it exists and is not a directory"
            )
        _writable_dir(path, path, what)
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    _writable_dir(ancestor, path, what)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def written_together(directory: Path, what: str) -> Iterator[list[Path]]:
    """Create ``directory`` if needed; yield a list to add each file written to. If the
    block fails, every file added is removed (and the directory, if this created it), and
    an ``OSError`` becomes a one-line :class:`CommandError`."""
    created = not directory.exists()
    written: list[Path] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        yield written
    except BaseException as exc:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(exc, OSError):
            raise CommandError(
                f"cannot write {what} to {str(directory)!r}: {exc.strerror or exc}"
            ) from None
        raise
