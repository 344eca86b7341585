"""Hostile state files: small files that must not crash, hang or exhaust the reader.

Each file here is structurally valid where that matters (headers, tensor
tables and checksums are made with the package's own writers), so the checks
behind the checksum are reached.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import actsparse.serialize as serialize
from actsparse.core import SerializationError
from actsparse.hooks import ActivationSparsifier
from actsparse.serialize._formats import (
    pack_text,
    unpack,
)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def stepped(model: torch.nn.Module) -> ActivationSparsifier:
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model[0])
    with torch.no_grad():
        model(torch.randn(4, 6))
    sparsifier.step()
    return sparsifier


# ---------------------------------------------- 7: strings that UTF-8 cannot hold


def _surrogate_states() -> dict[str, tuple[dict[str, Any], str]]:
    base = stepped(small_model()).state_dict()
    cases: dict[str, tuple[dict[str, Any], str]] = {}

    sd = copy.deepcopy(base)
    sd["data_groups"]["0"]["sparse_config"]["note"] = "x\udcff"
    cases["sparse_config value"] = (sd, "data_groups/0/sparse_config/note")

    sd = copy.deepcopy(base)
    sd["defaults"]["sparse_config"]["x\udcff"] = 1
    cases["sparse_config key"] = (sd, "defaults/sparse_config")

    sd = copy.deepcopy(base)
    sd["state"]["x\udcff"] = sd["state"].pop("0")
    sd["data_groups"]["x\udcff"] = sd["data_groups"].pop("0")
    cases["layer name"] = (sd, "state")

    sd = copy.deepcopy(base)
    sd["data_groups"]["0"]["sparse_config"]["pairs"] = {1: ("ok", "\ud800")}
    cases["inside a tuple in a $dict"] = (sd, "data_groups/0/sparse_config/pairs/1/1")

    sd = copy.deepcopy(base)
    sd["defaults"]["mask_fn"] = "magnitude\udcff"
    cases["strategy name"] = (sd, "defaults/mask_fn")
    return cases


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("case", list(_surrogate_states()))
def test_a_lone_surrogate_is_refused_naming_its_place_and_nothing_is_written(
    tmp_path: Path, fmt: str, case: str
) -> None:
    sd, where = _surrogate_states()[case]
    target = tmp_path / "out.bin"
    with pytest.raises(SerializationError) as info:
        serialize.save(sd, target, format=fmt)
    message = str(info.value)
    assert f"{where}:" in message, message
    assert "surrogate" in message
    message.encode("utf-8")  # the message itself can be printed
    assert list(tmp_path.iterdir()) == []


def test_a_file_whose_state_holds_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    """A JSON escape decodes to a lone surrogate; the file is signed, so the decoder decides."""
    data = serialize.save(stepped(small_model()), tmp_path / "s.safetensors").read_bytes()
    doc, tensors = unpack(data)
    doc["data_groups"]["0"]["sparse_config"]["note"] = "placeholder"
    text = json.dumps(doc).replace('"placeholder"', '"\\udcff"')
    path = tmp_path / "bad.safetensors"
    path.write_bytes(pack_text(text, tensors))
    with pytest.raises(SerializationError, match=r"data_groups/0/sparse_config/note.*surrogate"):
        serialize.load(path)
    doc["data_groups"]["0"]["sparse_config"]["note"] = {"placeholder": 1}
    path.write_bytes(pack_text(json.dumps(doc).replace('"placeholder"', '"\\ud800"'), tensors))
    with pytest.raises(SerializationError, match=r"data_groups/0/sparse_config/note.*surrogate"):
        serialize.load(path)
