"""The safetensors layout written and read here agrees with the safetensors package."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from _seed import run_seed_workflow
from hypothesis import given, settings
from hypothesis import strategies as st

import actsparse.serialize as serialize
from actsparse.core import SerializationError
from actsparse.serialize._safetensors import read_safetensors, write_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")
safe_open = pytest.importorskip("safetensors").safe_open

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


@st.composite
def tensor_tables(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(st.text("abcxyz/._0123", min_size=1, max_size=8), max_size=5, unique=True)
    )
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    table = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        table[name] = (torch.randn(shape, generator=generator) * 100).to(dtype)
    return table


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert right[name].dtype == tensor.dtype
        assert right[name].shape == tensor.shape
        assert torch.equal(right[name], tensor)


@settings(max_examples=60, deadline=None)
@given(tensor_tables(), st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3))
def test_both_directions(
    tmp_path_factory: pytest.TempPathFactory,
    table: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> None:
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    # ours -> safetensors
    path.write_bytes(write_safetensors(table, metadata))
    _same(table, safetensors_torch.load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        assert (f.metadata() or {}) == metadata
    # safetensors -> ours
    safetensors_torch.save_file(table, str(path), metadata=metadata or None)
    tensors, read_metadata = read_safetensors(path.read_bytes())
    _same(table, tensors)
    assert read_metadata == metadata


def test_state_file_opens_with_safetensors(tmp_path: Path) -> None:
    _, sparsifier = run_seed_workflow(batches=1)
    path = serialize.save(sparsifier, tmp_path / "seed.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        names = list(f.keys())
    assert metadata["format"] == "actsparse"
    assert metadata["format_version"] == "1"
    state = json.loads(metadata["state"])
    assert set(state["state"]) == {"conv1", "linear1", "identity1", "identity2"}
    assert "state/identity1/mask" in names
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert (8 + length) % 8 == 0  # the data section is aligned, as safetensors writes it


def test_unsupported_dtype_is_named() -> None:
    with pytest.raises(SerializationError, match="complex64"):
        write_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, {})
