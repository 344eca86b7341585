"""Compact encodings of {0, 1} masks.

A mask whose values are all 0 or 1 is stored as one of

* ``constant``: every value is the same; no tensor at all (restored as a
  stride-0 view, the way the runtime keeps its all-ones placeholder masks);
* ``bitpack``: one bit per value, most significant bit first, in uint8 bytes;
* ``rle``: the lengths of the alternating runs of equal values, starting with
  the value ``first``;
* ``coo``: the sorted flat indices of the values that differ from ``fill``;

whichever takes the fewest bytes for that mask. Any other mask is stored
``dense``. The record written for each mask holds its dtype and shape, so it
comes back exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from actsparse.core import SerializationError

__all__ = ["ENCODINGS", "MAX_MASK_ELEMENTS", "decode_mask", "encode_mask", "parse_dtype"]

ENCODINGS = ("constant", "bitpack", "rle", "coo", "dense")
#: The most elements a stored mask may claim: a corrupted or hostile file cannot
#: make the reader allocate more than this for one mask.
MAX_MASK_ELEMENTS = 2**31 - 1
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
#: How many values the decoder builds at a time, besides the mask itself.
_CHUNK = 1 << 18
_INT_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def _index_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype that holds 0..largest."""
    for dtype in _INT_DTYPES:
        if largest <= (torch.iinfo(dtype).max):
            return dtype
    raise SerializationError(f"a mask with {largest} elements is too large to store")


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: object, *, where: str) -> torch.dtype:
    """The torch dtype named by ``value`` (as :func:`dtype_str` writes it)."""
    dtype = getattr(torch, value, None) if isinstance(value, str) and value.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise SerializationError(f"{where}: {value!r} is not a torch dtype")
    return dtype


def encode_mask(mask: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The record and the tensor (None for ``constant``) that store ``mask``."""
    mask = mask.detach()
    record: dict[str, Any] = {"dtype": dtype_str(mask.dtype), "shape": list(mask.shape)}
    n = mask.numel()
    if mask.layout != torch.strided:
        raise SerializationError(f"a mask must be a strided tensor, got layout {mask.layout}")
    if mask.is_complex() or n == 0:
        return {"encoding": "dense", **record}, mask.contiguous()
    mask = mask.to("cpu")
    ones = mask if mask.dtype == torch.bool else mask == 1
    if mask.dtype != torch.bool and not bool(torch.logical_or(ones, mask == 0).all()):
        return {"encoding": "dense", **record}, mask.contiguous()
    bits = ones.reshape(-1)
    count = int(torch.count_nonzero(bits))  # bits.sum() would make an int64 copy
    if count in (0, n):
        return {"encoding": "constant", "value": int(count == n), **record}, None

    candidates: list[tuple[int, str]] = [(math.ceil(n / 8), "bitpack")]
    change = torch.nonzero(bits[1:] != bits[:-1]).reshape(-1) + 1
    bounds = torch.cat((torch.zeros(1, dtype=torch.long), change, torch.tensor([n])))
    runs = bounds[1:] - bounds[:-1]
    run_dtype = _index_dtype(int(runs.max()))
    candidates.append((runs.numel() * run_dtype.itemsize, "rle"))
    index_dtype = _index_dtype(n - 1)
    minority = min(count, n - count)
    candidates.append((minority * index_dtype.itemsize, "coo"))
    _, encoding = min(candidates, key=lambda c: c[0])  # ties keep the earlier: bitpack

    if encoding == "bitpack":
        padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8)
        padded[:n] = bits
        packed = (padded.reshape(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)
        return {"encoding": "bitpack", **record}, packed
    if encoding == "rle":
        return {"encoding": "rle", "first": int(bits[0]), **record}, runs.to(run_dtype)
    fill = int(count > n - count)  # the majority value is implied
    indices = torch.nonzero(bits != bool(fill)).reshape(-1)
    return {"encoding": "coo", "fill": fill, **record}, indices.to(index_dtype)


def _flag(record: Mapping[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if value not in (0, 1) or isinstance(value, bool):
        raise SerializationError(f"{where}: {key!r} must be 0 or 1, got {value!r}")
    return int(value)


def _vector(tensor: torch.Tensor | None, where: str, *, integer: bool = True) -> torch.Tensor:
    if tensor is None:
        raise SerializationError(f"{where}: the encoding needs a tensor and none is stored")
    if tensor.ndim != 1 or (integer and tensor.dtype not in _INT_DTYPES):
        raise SerializationError(
            f"{where}: the stored tensor must be a 1-d integer tensor, got "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    return tensor


def _unpack_bits(packed: torch.Tensor, out: torch.Tensor) -> None:
    """Write the bits of ``packed`` into the flat ``out``, a chunk at a time."""
    n = out.numel()
    step = _CHUNK // 8
    for start in range(0, packed.numel(), step):
        bits = ((packed[start : start + step].unsqueeze(1) >> _SHIFTS) & 1).reshape(-1)
        low = start * 8
        high = min(n, low + bits.numel())
        out[low:high].copy_(bits[: high - low])


def _expand_runs(runs: torch.Tensor, first: int, out: torch.Tensor) -> None:
    """Write the alternating runs (lengths ``runs``, the first of value ``first``) into the
    flat ``out``, one window of at most ``_CHUNK`` values at a time."""
    n = out.numel()
    ends = torch.cumsum(runs, dim=0, dtype=torch.int64)
    starts = ends - runs
    for low in range(0, n, _CHUNK):
        high = min(n, low + _CHUNK)
        # the runs that overlap [low, high): from the one holding low to the one holding high - 1
        a = int(torch.searchsorted(ends, low, right=True))
        b = int(torch.searchsorted(ends, high - 1, right=True)) + 1
        lengths = ends[a:b].clamp(max=high) - starts[a:b].clamp(min=low)
        values = ((torch.arange(a, b) + first) % 2).to(out.dtype)
        out[low:high] = torch.repeat_interleave(values, lengths)


def decode_mask(
    record: Mapping[str, Any], tensor: torch.Tensor | None, *, where: str
) -> torch.Tensor:
    """The mask that ``record`` (and its stored ``tensor``) describe, on the CPU.

    Every claim of the record is checked against the stored tensor before
    anything is allocated. A packed mask is decoded straight into a tensor of
    its own dtype, a chunk at a time: decoding takes the mask's own memory
    and at most a few MiB besides.
    """
    encoding = record.get("encoding")
    if encoding not in ENCODINGS:
        raise SerializationError(f"{where}: unknown mask encoding {encoding!r}")
    dtype = parse_dtype(record.get("dtype"), where=where)
    shape = record.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > 64
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise SerializationError(f"{where}: shape must be a list of non-negative ints")
    n = math.prod(shape)
    if n > MAX_MASK_ELEMENTS:
        raise SerializationError(
            f"{where}: the mask claims {n} elements, more than the {MAX_MASK_ELEMENTS} allowed"
        )
    if encoding == "dense":
        if tensor is None or tensor.dtype != dtype or list(tensor.shape) != shape:
            raise SerializationError(
                f"{where}: the stored tensor does not have the mask's dtype {dtype} "
                f"and shape {shape}"
            )
        return tensor
    if tensor is not None and encoding == "constant":
        raise SerializationError(f"{where}: a constant mask stores no tensor")
    if encoding == "constant":
        value = _flag(record, "value", where)
        return torch.full((), value, dtype=dtype).expand(shape)
    if encoding == "bitpack":
        packed = _vector(tensor, where)
        if packed.dtype != torch.uint8 or packed.numel() != math.ceil(n / 8):
            raise SerializationError(
                f"{where}: {n} bit-packed values need {math.ceil(n / 8)} uint8 bytes, "
                f"the file holds {packed.numel()} {packed.dtype} values"
            )
        out = torch.empty(n, dtype=dtype)
        _unpack_bits(packed, out)
    elif encoding == "rle":
        runs = _vector(tensor, where)
        first = _flag(record, "first", where)
        if runs.numel() == 0 or bool((runs <= 0).any()) or int(runs.max()) > n:
            raise SerializationError(f"{where}: run lengths must be positive and at most {n}")
        total = int(runs.sum(dtype=torch.int64))
        if total != n:
            raise SerializationError(f"{where}: the runs cover {total} values, the shape {n}")
        out = torch.empty(n, dtype=dtype)
        _expand_runs(runs, first, out)
    else:
        indices = _vector(tensor, where)
        fill = _flag(record, "fill", where)
        if indices.numel() and (
            int(indices[0]) < 0
            or int(indices[-1]) >= n
            or bool((indices[1:] <= indices[:-1]).any())
        ):
            raise SerializationError(f"{where}: indices must increase strictly and lie in [0, {n})")
        out = torch.full((n,), fill, dtype=dtype)
        for start in range(0, indices.numel(), _CHUNK):
            out[indices[start : start + _CHUNK].to(torch.int64)] = 1 - fill
    return out.reshape(shape)
