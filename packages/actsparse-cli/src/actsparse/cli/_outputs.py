"""Output paths of the text commands: refused before any work if they cannot be written,
and written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from actsparse.cli._app import CommandError

__all__ = ["Staged", "check_dir", "check_file", "write_atomic", "written_together"]


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


def _a_directory(directory: Path, names: Iterable[str]) -> str | None:
    """The first of ``names`` that is a directory (not a link to one) in ``directory``."""
    for name in names:
        target = directory / name
        if target.is_dir() and not target.is_symlink():
            return name
    return None


def check_dir(path: Path, what: str, names: Iterable[str] = ()) -> None:
    """Refuse an output directory that exists as something else, or cannot be created, or
    in which one of the files ``names`` is a directory."""
    if path.exists():
        if not path.is_dir():
            raise CommandError(
                f"cannot write {what} to {str(path)!r}: it exists and is not a directory"
            )
        _writable_dir(path, path, what)
        name = _a_directory(path, names)
        if name is not None:
            raise CommandError(
                f"cannot write {what} to {str(path)!r}: {str(path / name)!r} is a directory"
            )
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


class Staged:
    """The files of :func:`written_together`, written to a temporary directory until the
    block ends."""

    def __init__(self, directory: Path, staging: Path, what: str) -> None:
        self.directory = directory
        self.staging = staging
        self.what = what
        self.names: list[str] = []
        #: Whether the temporary directory must stay (it holds an earlier file).
        self.keep = False

    def write(self, name: str, writer: Callable[[Path], object]) -> None:
        """Call ``writer`` with the temporary path of the file ``name`` of the directory."""
        self.names.append(name)
        try:
            writer(self.staging / name)
        except OSError as exc:
            raise self.failure(name, exc.strerror or str(exc)) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write(name, lambda path: write_atomic(path, data))

    def failure(self, name: str, reason: str) -> CommandError:
        return CommandError(
            f"cannot write {self.what} to {str(self.directory)!r}: "
            f"{str(self.directory / name)!r}: {reason}; every file there is as it was"
        )

    def move_into_place(self) -> None:
        """Move each file into the directory; if one fails, put back every file that was
        there before (and remove the new ones)."""
        blocking = _a_directory(self.directory, self.names)
        if blocking is not None:
            raise self.failure(blocking, "it is a directory")
        backups = self.staging / ".before"
        backups.mkdir()
        moved: list[tuple[Path, Path | None]] = []
        try:
            for name in self.names:
                target = self.directory / name
                backup = None
                if os.path.lexists(target):
                    backup = backups / name
                    os.replace(target, backup)
                moved.append((target, backup))
                os.replace(self.staging / name, target)
        except BaseException as exc:  # an interrupt too: never leave half the files moved
            kept = _put_back(moved)
            self.keep = bool(kept)  # then the only copy of an earlier file is in it
            if not isinstance(exc, OSError):
                raise
            reason = exc.strerror or str(exc)
            if not kept:
                raise self.failure(name, reason) from None
            raise CommandError(
                f"cannot write {self.what} to {str(self.directory)!r}: "
                f"{str(self.directory / name)!r}: {reason}; the earlier "
                f"{', '.join(kept)} could not be put back: they are in {str(backups)!r}"
            ) from None


def _put_back(moved: list[tuple[Path, Path | None]]) -> list[str]:
    """Undo the moves of :meth:`Staged.move_into_place`; the names of the earlier files
    that could not be put back."""
    kept = []
    for target, backup in reversed(moved):
        try:
            if backup is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(backup, target)
        except OSError:
            if backup is not None:
                kept.append(target.name)
    return sorted(kept)


@contextlib.contextmanager
def written_together(directory: Path, what: str) -> Iterator[Staged]:
    """Create ``directory`` if needed and yield a :class:`Staged` to write its files with.

    The files go to a temporary directory inside ``directory`` (so on the same file
    system) and, when the block ends, each is moved into place. If the block or a move
    fails, every file that was in ``directory`` before is there, unchanged; the new ones
    are removed (and ``directory``, if this created it), and an ``OSError`` becomes a
    one-line :class:`CommandError` that names the file.
    """
    created = _missing_ancestors(directory)
    staged: Staged | None = None
    try:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".actsparse-", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise CommandError(
                f"cannot write {what} to {str(directory)!r}: {exc.strerror or exc}"
            ) from None
        staged = Staged(directory, Path(staging), what)
        yield staged
        staged.move_into_place()
    except BaseException:
        _remove(staged)
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only while empty: never what another process wrote there
        raise
    _remove(staged)


def _remove(staged: Staged | None) -> None:
    if staged is not None and not staged.keep:
        shutil.rmtree(staged.staging, ignore_errors=True)


def _missing_ancestors(directory: Path) -> list[Path]:
    """``directory`` and those of its parents that do not exist, deepest first."""
    missing = []
    path = directory
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing
