"""The safetensors file layout, written and read without the ``safetensors`` package.

A file is an 8-byte little-endian unsigned header length ``n``, then ``n``
bytes of UTF-8 JSON, then the raw bytes of every tensor. The JSON maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the data section) and may hold ``"__metadata__"``,
a mapping of strings to strings.

The reader trusts nothing: it caps the header size, checks every offset
against the bytes the file really holds before it allocates anything, and
reports each problem as a :class:`~actsparse.core.SerializationError`.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from typing import Any

import torch

from actsparse.core import SerializationError

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "TensorEntry",
    "header_length",
    "parse_header",
    "read_safetensors",
    "write_safetensors",
]

#: safetensors dtype name <-> torch dtype, for every dtype this reader accepts.
DTYPES: Mapping[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

#: The largest header this reader accepts (the safetensors package caps it at 100 MB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
_LENGTH = struct.Struct("<Q")
_MAX_DIMS = 64

if sys.byteorder != "little":  # pragma: no cover - no big-endian machine runs torch wheels
    raise ImportError(
        "actsparse.serialize writes little-endian files and needs a little-endian host"
    )


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; an error for a dtype the format lacks."""
    try:
        return _NAMES[dtype]
    except KeyError:
        known = ", ".join(str(d).removeprefix("torch.") for d in _NAMES)
        raise SerializationError(
            f"tensors of dtype {dtype} cannot be stored (supported: {known})"
        ) from None


def _raw_bytes(tensor: torch.Tensor) -> bytearray:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    out = bytearray(flat.numel() * flat.element_size())
    if out:
        torch.frombuffer(out, dtype=torch.uint8).copy_(flat.view(torch.uint8))
    return out


def write_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` and ``metadata``."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    chunks: list[bytearray] = []
    offset = 0
    for name, tensor in tensors.items():
        if name == "__metadata__":
            raise SerializationError("'__metadata__' cannot name a tensor")
        if tensor.layout != torch.strided:
            raise SerializationError(f"tensor {name!r} has layout {tensor.layout}, not strided")
        raw = _raw_bytes(tensor)
        header[name] = {
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        chunks.append(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    # Pad with spaces so that the data section starts 8-byte aligned, as safetensors does.
    text += b" " * (-len(text) % 8)
    return b"".join((_LENGTH.pack(len(text)), text, *chunks))


class TensorEntry:
    """One checked entry of a header: where a tensor's bytes lie and what they are."""

    __slots__ = ("begin", "dtype", "end", "name", "shape")

    def __init__(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.begin = begin
        self.end = end

    def describe(self) -> list[Any]:
        """A canonical, JSON-ready description (used for checksums)."""
        return [self.name, _NAMES[self.dtype], list(self.shape), self.begin, self.end]

    @property
    def numel(self) -> int:
        """The number of elements the entry holds."""
        return (self.end - self.begin) // self.dtype.itemsize


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, raw: object, data_len: int) -> TensorEntry:
    where = f"tensor {name!r}"
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise SerializationError(
            f"{where}: its header entry must hold exactly dtype, shape and data_offsets"
        )
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SerializationError(f"{where}: unknown dtype {dtype!r}")
    shape = raw["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(_is_int(s) and s >= 0 for s in shape)
    ):
        raise SerializationError(
            f"{where}: shape must be a list of at most {_MAX_DIMS} non-negative ints"
        )
    offsets = raw["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise SerializationError(
            f"{where}: data_offsets {offsets!r} do not lie within the {data_len} data bytes "
            "that the file holds"
        )
    torch_dtype = DTYPES[dtype]
    expected = math.prod(shape) * torch_dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise SerializationError(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes, but its data_offsets "
            f"span {offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, torch_dtype, tuple(shape), offsets[0], offsets[1])


def header_length(prefix: bytes | bytearray, size: int) -> int:
    """The header length that a file of ``size`` bytes starting with ``prefix`` declares.

    Checked against :data:`MAX_HEADER_BYTES` and against ``size``, so that a
    reader can read the first 8 bytes of a file, then exactly this many.
    """
    if size < _LENGTH.size or len(prefix) < _LENGTH.size:
        raise SerializationError(
            f"the file holds {size} bytes, fewer than the 8-byte header length"
        )
    (length,) = _LENGTH.unpack_from(prefix)
    if length > MAX_HEADER_BYTES:
        raise SerializationError(
            f"the header claims {length} bytes, more than the {MAX_HEADER_BYTES} "
            "this reader accepts"
        )
    if length > size - _LENGTH.size:
        raise SerializationError(
            f"the header claims {length} bytes but the file holds only {size - _LENGTH.size} "
            "after the length field (truncated?)"
        )
    return int(length)


def parse_header(
    buf: bytes | bytearray, size: int | None = None
) -> tuple[list[TensorEntry], dict[str, str], int]:
    """Check the header of a safetensors file held in ``buf``.

    Returns the tensor entries (sorted by offset), the metadata and where the
    data section starts. Nothing is allocated in proportion to what the
    header claims. ``size`` is the size of the whole file when ``buf`` holds
    only its beginning (the length field and the header).
    """
    size = len(buf) if size is None else size
    length = header_length(buf, size)
    start = _LENGTH.size + length
    if len(buf) < start:
        raise SerializationError(f"the buffer holds {len(buf)} bytes, not the whole header")
    try:
        header = json.loads(bytes(buf[_LENGTH.size : start]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"the header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SerializationError("the header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SerializationError("the header's __metadata__ must map strings to strings")
    data_len = size - start
    entries = sorted(
        (_entry(name, raw, data_len) for name, raw in header.items()),
        key=lambda e: (e.begin, e.end),
    )
    position = 0
    for entry in entries:
        if entry.begin != position:
            problem = "overlaps another" if entry.begin < position else "leaves a gap before it"
            raise SerializationError(f"tensor {entry.name!r}: its data {problem}")
        position = entry.end
    if position != data_len:
        raise SerializationError(
            f"the tensors cover {position} data bytes but the file holds {data_len} "
            "(trailing bytes or a wrong header)"
        )
    return entries, metadata, start


def tensor_at(buf: bytearray, entry: TensorEntry, start: int) -> torch.Tensor:
    """A copy of the tensor that ``entry`` describes (``buf`` was checked by parse_header)."""
    count = entry.end - entry.begin
    if count == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=count, offset=start + entry.begin)
    return raw.view(entry.dtype).reshape(entry.shape).clone()


def read_safetensors(buf: bytes | bytearray) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file held in ``buf``."""
    data = buf if isinstance(buf, bytearray) else bytearray(buf)
    entries, metadata, start = parse_header(data)
    return {e.name: tensor_at(data, e, start) for e in entries}, metadata
