"""docs/cli.md describes every field that ``actsparse inspect --json`` writes,
threshold-mode layers' included."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import torch
from torch import nn

import actsparse.serialize as serialize
from actsparse.cli import main
from actsparse.hooks import ActivationSparsifier

ROOT = Path(__file__).resolve().parents[2]


def _threshold_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    sparsifier = ActivationSparsifier(
        model,
        aggregate_fn="abs_histogram",
        reduce_fn="identity",
        mask_fn="target_threshold",
        sparsity_level=0.5,
    )
    sparsifier.register_layer(model[2])
    model(torch.randn(64, 16))
    sparsifier.step()
    return serialize.save(sparsifier, tmp_path / "threshold.safetensors")


def _inspect(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", *args]) == 0
    return out.getvalue()


def test_the_json_fields_of_a_threshold_layer_are_documented(tmp_path: Path) -> None:
    report = json.loads(_inspect("--json", str(_threshold_file(tmp_path))))
    layer = report["layers"][0]
    assert layer["mask"] is None
    assert layer["threshold"] is not None
    documented = set(re.findall(r"`(\w+)`", (ROOT / "docs" / "cli.md").read_text()))
    fields = {*report, *layer, *layer["threshold"]}
    assert sorted(fields - documented) == []


def test_the_text_line_of_a_threshold_layer_is_shown_in_the_docs(tmp_path: Path) -> None:
    text = _inspect(str(_threshold_file(tmp_path)))
    line = next(line for line in text.splitlines() if "threshold:" in line)
    assert line in (ROOT / "docs" / "cli.md").read_text()
