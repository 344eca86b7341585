"""Mask encodings: exact round trips, and the smallest encoding is chosen."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.core import SerializationError
from actsparse.serialize._packing import _CHUNK, decode_mask, encode_mask

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.bool,
    torch.uint8,
    torch.int64,
]


def _stored_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@st.composite
def masks(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(1, 9), min_size=0, max_size=4))
    n = math.prod(shape)
    dtype = draw(st.sampled_from(DTYPES))
    style = draw(st.sampled_from(["random", "runs", "sparse", "dense"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if style == "random":
        bits = torch.rand(n, generator=generator) < draw(st.floats(0, 1))
    elif style == "runs":
        bits = torch.zeros(n, dtype=torch.bool)
        cut = draw(st.integers(0, n))
        bits[cut:] = True
    else:
        p = 0.02 if style == "sparse" else 0.98
        bits = torch.rand(n, generator=generator) < p
    return bits.to(dtype).reshape(shape)


@settings(max_examples=300, deadline=None)
@given(masks())
def test_roundtrip_is_exact_and_smallest(mask: torch.Tensor) -> None:
    record, tensor = encode_mask(mask)
    back = decode_mask(record, tensor, where="m")
    assert back.dtype == mask.dtype
    assert back.shape == mask.shape
    assert torch.equal(back, mask)
    n = mask.numel()
    assert record["encoding"] in ("constant", "bitpack", "rle", "coo")
    # never larger than one bit per value
    assert _stored_bytes(tensor) <= math.ceil(n / 8)
    if record["encoding"] != "constant":
        ones = int((mask == 1).sum())
        assert 0 < ones < n
        # coo lists the minority values
        if record["encoding"] == "coo":
            assert tensor is not None
            assert tensor.numel() == min(ones, n - ones)


def test_large_masks_pick_each_encoding() -> None:
    half = (torch.arange(4096) % 2).float()
    assert encode_mask(half)[0]["encoding"] == "bitpack"
    block = (torch.arange(4096) >= 1000).float()
    assert encode_mask(block)[0]["encoding"] == "rle"
    few = torch.zeros(4096)
    few[[3, 77, 2000]] = 1
    assert encode_mask(few)[0]["encoding"] == "coo"
    assert encode_mask(torch.ones(4096))[0]["encoding"] == "constant"
    record, tensor = encode_mask(torch.tensor([0.0, 0.5, 1.0]))
    assert record["encoding"] == "dense"
    assert torch.equal(decode_mask(record, tensor, where="m"), torch.tensor([0.0, 0.5, 1.0]))


def test_placeholder_masks_cost_nothing() -> None:
    placeholder = torch.ones((), dtype=torch.float32).expand(64, 32, 24, 24)
    record, tensor = encode_mask(placeholder)
    assert record["encoding"] == "constant"
    assert tensor is None
    back = decode_mask(record, tensor, where="m")
    assert back.shape == placeholder.shape
    assert back.stride() == (0, 0, 0, 0)


def test_bitpack_matches_a_reference_packing() -> None:
    bits = [1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    mask = torch.tensor(bits, dtype=torch.float32)
    record, tensor = encode_mask(mask)
    assert record["encoding"] == "bitpack"
    assert tensor is not None
    expected = [int("".join(map(str, (bits + [0] * 8)[i : i + 8])), 2) for i in (0, 8, 16)]
    assert tensor.tolist() == expected


def _forced(bits: torch.Tensor, encoding: str, dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
    """The record and tensor of ``bits`` in ``encoding``, whatever encoding is smallest."""
    n = bits.numel()
    record: dict = {"encoding": encoding, "dtype": str(dtype).removeprefix("torch."), "shape": [n]}
    if encoding == "bitpack":
        padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8)
        padded[:n] = bits
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
        return record, (padded.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    if encoding == "rle":
        change = torch.nonzero(bits[1:] != bits[:-1]).reshape(-1) + 1
        bounds = torch.cat((torch.tensor([0]), change, torch.tensor([n])))
        record["first"] = int(bits[0])
        return record, (bounds[1:] - bounds[:-1]).to(torch.int32)
    record["fill"] = 1
    return record, torch.nonzero(~bits).reshape(-1).to(torch.int32)


@pytest.mark.parametrize("encoding", ["bitpack", "rle", "coo"])
@pytest.mark.parametrize("n", [_CHUNK - 1, _CHUNK, _CHUNK + 1, 3 * _CHUNK + 5])
def test_masks_across_the_decoders_chunks_come_back_exactly(encoding: str, n: int) -> None:
    """Runs and indices that straddle the chunks the decoder works in, in several dtypes."""
    generator = torch.Generator().manual_seed(n)
    bits = torch.ones(n, dtype=torch.bool)
    for start in (0, _CHUNK - 3, _CHUNK - 1, _CHUNK, 2 * _CHUNK + 7, n - 2):
        bits[start : start + 5] = False  # runs across the chunk boundaries
    bits[torch.randint(0, n, (200,), generator=generator)] = False
    for dtype in (torch.bool, torch.float32, torch.bfloat16, torch.int64):
        record, tensor = _forced(bits, encoding, dtype)
        back = decode_mask(record, tensor, where="m")
        assert back.dtype == dtype
        assert back.is_contiguous()
        assert torch.equal(back, bits.to(dtype))


@pytest.mark.parametrize(
    ("record", "tensor", "message"),
    [
        ({"encoding": "zip", "dtype": "float32", "shape": [3]}, None, "unknown mask encoding"),
        ({"encoding": "constant", "dtype": "os", "shape": [3], "value": 1}, None, "dtype"),
        ({"encoding": "constant", "dtype": "float32", "shape": [-1], "value": 1}, None, "shape"),
        (
            {"encoding": "constant", "dtype": "float32", "shape": [2**40], "value": 1},
            None,
            "claims",
        ),
        ({"encoding": "constant", "dtype": "float32", "shape": [3], "value": 2}, None, "0 or 1"),
        (
            {"encoding": "bitpack", "dtype": "float32", "shape": [100]},
            torch.zeros(3, dtype=torch.uint8),
            "need 13",
        ),
        (
            {"encoding": "rle", "dtype": "float32", "shape": [10], "first": 0},
            torch.tensor([4, 5], dtype=torch.uint8),
            "cover 9",
        ),
        (
            {"encoding": "rle", "dtype": "float32", "shape": [10], "first": 0},
            torch.tensor([0, 10], dtype=torch.int16),
            "positive",
        ),
        (
            {"encoding": "coo", "dtype": "float32", "shape": [10], "fill": 0},
            torch.tensor([3, 3], dtype=torch.uint8),
            "increase",
        ),
        (
            {"encoding": "coo", "dtype": "float32", "shape": [10], "fill": 0},
            torch.tensor([3, 10], dtype=torch.uint8),
            r"\[0, 10\)",
        ),
        (
            {"encoding": "coo", "dtype": "float32", "shape": [10], "fill": 0},
            torch.tensor([[3]], dtype=torch.uint8),
            "1-d",
        ),
        ({"encoding": "dense", "dtype": "float32", "shape": [2]}, torch.zeros(3), "shape"),
    ],
)
def test_bad_records_are_refused(record: dict, tensor: torch.Tensor | None, message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        decode_mask(record, tensor, where="m")
