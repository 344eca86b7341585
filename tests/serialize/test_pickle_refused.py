"""A file that carries a pickle payload is refused, and the payload never runs."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import actsparse.serialize as serialize
from actsparse.core import SerializationError


class Payload:
    """Unpickling this writes ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_payload_is_live(tmp_path: Path) -> None:
    """The control: unpickling the payload does run it."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("fmt", [None, "safetensors", "torch"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bare_pickle_is_refused(tmp_path: Path, fmt: str | None, suffix: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"state": Payload(marker)}))
    with pytest.raises(SerializationError) as info:
        serialize.load(path, format=fmt)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", [None, "torch"])
def test_torch_save_with_code_is_refused(tmp_path: Path, fmt: str | None) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    payload = {
        "format": "actsparse-torch",
        "format_version": 1,
        "state_dict": {"state": {}, "data_groups": {}, "defaults": Payload(marker)},
    }
    torch.save(payload, path)
    with pytest.raises(SerializationError, match="weights_only") as info:
        serialize.load(path, format=fmt)
    assert str(path) in str(info.value)
    assert not marker.exists()
