"""File formats are detected through the registry: each serializer sniffs its own files."""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from actsparse import serialize
from actsparse.core import (
    ConfigError,
    SerializationError,
    Serializer,
    hookimpl,
    register_plugin,
    unregister_plugin,
)

MAGIC = b"JSONSTATE\n"


def _dumps(state_dict: Any) -> bytes:
    # a toy text format: masks as nested lists (enough to prove the registry path)
    sd = serialize.from_torch_ao(state_dict)
    state = {
        name: {"mask": None if e["mask"] is None else e["mask"].tolist()}
        for name, e in sd["state"].items()
    }
    return MAGIC + json.dumps({**sd, "state": state}).encode()


def _loads(buf: bytes) -> dict[str, Any]:
    doc = json.loads(bytes(buf[len(MAGIC) :]))
    doc["state"] = {
        name: {"mask": None if e["mask"] is None else torch.tensor(e["mask"])}
        for name, e in doc["state"].items()
    }
    return doc


def _plugin(name: str, sniff: Any, suffix: str = ".jstate") -> types.SimpleNamespace:
    @hookimpl
    def actsparse_serializers() -> list[Serializer]:
        return [
            Serializer(
                name=name, dumps=_dumps, loads=_loads, binary=True, suffix=suffix, sniff=sniff
            )
        ]

    return types.SimpleNamespace(actsparse_serializers=actsparse_serializers)


@pytest.fixture
def json_format() -> Iterator[str]:
    plugin = _plugin("jstate", lambda head: head.startswith(MAGIC))
    name = register_plugin(plugin, name="test-jstate")
    try:
        yield "jstate"
    finally:
        unregister_plugin(name=name)


STATE = {
    "state": {"lin": {"mask": torch.tensor([1.0, 0.0, 1.0])}},
    "data_groups": {
        "lin": {
            "aggregate_fn": "sum",
            "reduce_fn": "mean",
            "mask_fn": "magnitude",
            "features": None,
            "feature_dim": None,
            "sparse_config": {"sparsity_level": 0.3},
            "hook_state": "sparsify",
        }
    },
    "defaults": {
        "aggregate_fn": None,
        "reduce_fn": None,
        "mask_fn": None,
        "features": None,
        "feature_dim": None,
        "sparse_config": {},
    },
}


def test_built_in_formats_recognise_their_own_files(tmp_path: Path) -> None:
    for name, fmt in (("a.safetensors", "safetensors"), ("a.pt", "torch")):
        path = serialize.save(STATE, tmp_path / name)
        assert serialize.detect_format(path.read_bytes()[:64]) == fmt


def test_a_third_party_format_is_found_on_save_and_on_load(
    tmp_path: Path, json_format: str
) -> None:
    path = serialize.save(STATE, tmp_path / "s.jstate")  # by suffix
    assert path.read_bytes().startswith(MAGIC)
    assert serialize.detect_format(path.read_bytes()) == json_format
    # a name without the suffix: found by content alone
    moved = path.rename(tmp_path / "no-suffix")
    back = serialize.load(moved)
    assert torch.equal(back["state"]["lin"]["mask"], STATE["state"]["lin"]["mask"])


def test_two_formats_claiming_a_file_is_an_error_naming_both(tmp_path: Path) -> None:
    greedy = register_plugin(_plugin("greedy", lambda head: True, suffix=".greedy"), name="greedy")
    try:
        path = serialize.save(STATE, tmp_path / "s.safetensors")
        with pytest.raises(
            SerializationError, match=r"'safetensors', 'greedy'|'greedy', 'safetensors'"
        ):
            serialize.load(path)
        assert serialize.load(path, format="safetensors")["state"].keys() == {"lin"}
    finally:
        unregister_plugin(name=greedy)


def test_a_sniff_that_raises_recognises_nothing(tmp_path: Path) -> None:
    def broken(head: bytes) -> bool:
        raise RuntimeError("boom")

    name = register_plugin(_plugin("broken", broken, suffix=".broken"), name="broken")
    try:
        path = serialize.save(STATE, tmp_path / "s.pt")
        assert serialize.detect_format(path.read_bytes()) == "torch"
    finally:
        unregister_plugin(name=name)


def test_unrecognised_bytes_are_read_as_the_default_format(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\x00" * 40)
    assert serialize.detect_format(path.read_bytes()) == serialize.DEFAULT_FORMAT
    with pytest.raises(SerializationError, match=str(path)):
        serialize.load(path)


def test_only_file_formats_sniff() -> None:
    with pytest.raises(ConfigError, match="sniff needs binary=True"):
        Serializer(name="x", dumps=dict, loads=dict, sniff=lambda head: True)
