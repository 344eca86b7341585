"""``save`` / ``load``: state files written atomically and read with suspicion."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from actsparse.core import (
    SNIFF_BYTES,
    ActsparseError,
    SerializationError,
    Serializer,
    get_registry,
)
from actsparse.serialize._codec import map_tensors
from actsparse.serialize._formats import (
    check_header,
    check_torch_zip,
    is_torch_zip,
    safetensors_loads,
    torch_loads,
)
from actsparse.serialize._limits import element_cap
from actsparse.serialize._safetensors import header_length

__all__ = ["DEFAULT_FORMAT", "detect_format", "load", "load_into", "save"]

#: The format ``save`` writes unless told otherwise (or unless the suffix names another).
DEFAULT_FORMAT = "safetensors"
_CHUNK = 1 << 20

PathLike = str | os.PathLike[str]
Device = str | torch.device | None


def _serializer(format: str, path: Path) -> Serializer:
    serializer: Serializer = get_registry().get("serializer", format)
    if not serializer.binary:
        raise SerializationError(
            f"{path}: serializer {format!r} converts state dicts in memory and cannot write "
            "files; use a file format such as 'safetensors' or 'torch'"
        )
    return serializer


def _format_for_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix:
        for entry in get_registry().entries("serializer"):
            record: Serializer = entry.record
            if record.binary and record.suffix.lower() == suffix:
                return record.name
    return DEFAULT_FORMAT


def _state_dict_of(obj: object) -> Any:
    if isinstance(obj, Mapping):
        return obj
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict) and not isinstance(obj, torch.nn.Module):
        return state_dict()
    raise SerializationError(
        f"save() takes a sparsifier or its state dict, got {type(obj).__name__}"
    )


def _write_all(fh: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        fh.write(view[start : start + _CHUNK])


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``.

    A failure at any point leaves ``path`` as it was and removes the temporary file.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        # Make the rename itself durable.
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
            pass
        finally:
            os.close(dir_fd)


def save(obj: object, path: PathLike, *, format: str | None = None) -> Path:
    """Write a sparsifier (or its state dict) to ``path``, atomically.

    Args:
        obj: An ``ActivationSparsifier`` or a state dict of one (actsparse's or torch.ao's).
        path: The file to write; an existing file is replaced only once the new
            one is complete on disk.
        format: A registered file format: ``"safetensors"`` (the default) or
            ``"torch"``. ``None`` picks the format whose suffix ``path`` has,
            else the default.

    Returns:
        The path written.

    Raises:
        SerializationError: A strategy is not registered (the message names the
            layer, the key and how to register it), a value is not plain data,
            or the format cannot write files.
    """
    target = Path(path)
    name = _format_for_suffix(target) if format is None else format
    serializer = _serializer(name, target)
    state_dict = _state_dict_of(obj)
    try:
        data = serializer.dumps(state_dict)
    except SerializationError as exc:
        raise SerializationError(f"cannot write {target}: {exc}") from exc
    if not isinstance(data, (bytes, bytearray)):
        raise SerializationError(
            f"serializer {name!r} returned {type(data).__name__}, not bytes, for {target}"
        )
    _atomic_write(target, bytes(data))
    return target


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
# O_NONBLOCK: opening a FIFO does not wait for a writer; O_NOCTTY: a terminal
# never becomes the controlling one. Both are no-ops for the regular files kept.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_NONBLOCK", 0)
)


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    raise SerializationError(
        f"{path}: is {kind}, not a regular file; state files are read from regular files only"
    )


def _open_regular(path: Path) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file; refuse anything else at once.

    ``stat`` first, so that nothing else is even opened; ``fstat`` after the
    (non-blocking) open, in case the path was swapped in between.
    """
    _check_regular(path, os.stat(path).st_mode)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_into(fh: IO[bytes], view: memoryview) -> None:
    filled = 0
    while filled < len(view):
        count = fh.readinto(view[filled:])  # type: ignore[attr-defined]
        if not count:
            raise SerializationError("the file shrank while it was read")
        filled += count


def _read_exact(fh: IO[bytes], count: int) -> bytearray:
    buf = bytearray(count)
    _read_into(fh, memoryview(buf))
    return buf


def _peek(fh: IO[bytes], count: int) -> bytes:
    data = fh.read(count)
    fh.seek(0)
    return data


def _read_safetensors(fh: IO[bytes], size: int) -> bytearray:
    """Read the length field, then the header, check both, and only then the data."""
    prefix = _read_exact(fh, min(size, 8))
    length = header_length(prefix, size)
    head = prefix + _read_exact(fh, length)
    check_header(head, size)
    buf = bytearray(size)
    buf[: len(head)] = head
    _read_into(fh, memoryview(buf)[len(head) :])
    return buf


def _read_torch(fh: IO[bytes], size: int) -> bytearray:
    """Check the zip's declared sizes from its central directory, then read the file."""
    if not is_torch_zip(_peek(fh, 4)):
        raise SerializationError("not a torch zip file (torch.save writes zip files)")
    check_torch_zip(fh, size)
    fh.seek(0)
    return _read_exact(fh, size)


def _read(fh: IO[bytes], size: int, where: Path, serializer: Serializer) -> bytearray:
    """The file's bytes, read only as far as the format's own checks allow."""
    try:
        if serializer.loads is safetensors_loads:
            return _read_safetensors(fh, size)
        if serializer.loads is torch_loads:
            return _read_torch(fh, size)
        return _read_exact(fh, size)  # another plugin's format: its own checks apply
    except SerializationError as exc:
        raise SerializationError(f"{where}: {exc}") from None
    except MemoryError:
        raise SerializationError(
            f"{where}: there is not enough memory to read its {size} bytes"
        ) from None


def detect_format(head: bytes | bytearray, *, source: object = "the file") -> str:
    """The name of the registered file format whose ``sniff`` recognises ``head``.

    Every registered binary serializer with a ``sniff`` is asked, third
    parties' too. A file that none recognises is read as the default format,
    whose reader then says precisely what is wrong with it.

    Args:
        head: The start of a file; its first ``SNIFF_BYTES`` (64) bytes suffice.
        source: What to call the file in an error message.

    Returns:
        The format's name (``"safetensors"``, ``"torch"``, or a plugin's), or
        :data:`DEFAULT_FORMAT` when no format recognises ``head``.

    Raises:
        SerializationError: More than one format recognises it.
    """
    head = bytes(head[:SNIFF_BYTES])
    matches = [
        entry.record.name
        for entry in get_registry().entries("serializer")
        if entry.record.binary and entry.record.recognises(head)
    ]
    if len(matches) > 1:
        raise SerializationError(
            f"{source}: the formats {', '.join(map(repr, matches))} all claim it; pass "
            "format=... to choose"
        )
    return matches[0] if matches else DEFAULT_FORMAT


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    if tensor.numel() > 1 and all(s == 0 for s in tensor.stride()):
        # A constant mask: keep it a stride-0 view on the new device.
        return tensor.as_strided((), ()).to(device).expand(tensor.shape)
    return tensor.to(device)


def load(
    path: PathLike,
    *,
    format: str | None = None,
    map_location: Device = None,
    max_elements: int | None = None,
) -> dict[str, Any]:
    """Read a state file into a state dict that ``load_state_dict`` accepts.

    Args:
        path: The file; it must be a regular file (a FIFO, a device or a
            directory is refused at once).
        format: The format to read; ``None`` asks every registered format's
            ``sniff`` which one the file is in.
        map_location: The device for every tensor (masks and aggregated data);
            ``None`` keeps them on the CPU.
        max_elements: The most elements the file may declare, masks counted
            at their full shape (see docs/formats.md); ``None`` reads
            ``ACTSPARSE_MAX_ELEMENTS``, else bounds it by the file's size:
            8 elements per byte, at least 2**23, at most 2**28.

    Raises:
        SerializationError: The file is truncated, corrupted, of an unknown
            format version, not a state file, not a regular file, or declares
            more than the caps allow; the message names the file.
        ConfigError: ``max_elements`` (or ``ACTSPARSE_MAX_ELEMENTS``) is not
            a positive int.
        OSError: The file cannot be opened.
    """
    source = Path(path)
    with element_cap(max_elements), _open_regular(source) as fh:
        size = os.fstat(fh.fileno()).st_size
        name = detect_format(_peek(fh, SNIFF_BYTES), source=source) if format is None else format
        serializer = _serializer(name, source)
        buf = _read(fh, size, source, serializer)
        try:
            state_dict: dict[str, Any] = serializer.loads(buf)
        except SerializationError as exc:
            raise SerializationError(f"{source}: {exc}") from None
        except MemoryError:
            raise SerializationError(
                f"{source}: there is not enough memory to load it as {name!r}"
            ) from None
        except Exception as exc:
            raise SerializationError(f"{source}: cannot be read as {name!r}: {exc!r}") from exc
    if map_location is not None:
        device = torch.device(map_location)
        state_dict = map_tensors(state_dict, lambda t: _to_device(t, device))
    return state_dict


def load_into(
    sparsifier: Any,
    path: PathLike,
    *,
    format: str | None = None,
    map_location: Device = None,
    max_elements: int | None = None,
) -> None:
    """``sparsifier.load_state_dict(load(path))``, with the file named in any error.

    Args:
        sparsifier: An ``ActivationSparsifier`` over a model of the architecture
            the file was saved from.
        path: The file.
        format: The format to read; ``None`` detects it (see :func:`load`).
        map_location: The device for every tensor; ``None`` keeps the CPU.
        max_elements: Caps what the file may declare, as for :func:`load`.

    Raises:
        SerializationError: The file cannot be read (see :func:`load`), or a
            layer's mask, threshold or data does not fit.
        LayerNotFoundError: A layer of the file is not in the sparsifier's model.
        UnknownStrategyError: The file names a strategy that no installed
            plugin provides.
        OSError: The file cannot be opened.

    On any error the sparsifier is unchanged.
    """
    state_dict = load(path, format=format, map_location=map_location, max_elements=max_elements)
    try:
        sparsifier.load_state_dict(state_dict)
    except ActsparseError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
