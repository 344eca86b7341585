"""``actsparse ... | head``: a reader that goes away stops the command quietly.

A real subprocess writes into a pipe whose reading end is already closed, as
``head`` leaves it; the command must exit with 141 (128 + SIGPIPE) and print
no traceback and no "Exception ignored" line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import actsparse.serialize as serialize
from actsparse.cli._app import BROKEN_PIPE_STATUS
from actsparse.hooks import ActivationSparsifier


def _run_into_a_closed_pipe(*args: str) -> tuple[int, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "actsparse.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # the reader is gone before the first line is written
    err = process.stderr.read().decode()
    process.stderr.close()
    return process.wait(timeout=120), err


@pytest.fixture(scope="module")
def state_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(40)))
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    for layer in model:
        sparsifier.register_layer(layer)
    model(torch.randn(2, 8))
    sparsifier.step()
    return serialize.save(sparsifier, tmp_path_factory.mktemp("pipe") / "many.safetensors")


@pytest.mark.parametrize(
    "args",
    [("inspect", "STATE"), ("inspect", "--json", "STATE"), ("plugins",)],
    ids=lambda a: " ".join(a),
)
def test_a_closed_pipe_ends_the_command_quietly(args: tuple[str, ...], state_file: Path) -> None:
    code, err = _run_into_a_closed_pipe(*(str(state_file) if a == "STATE" else a for a in args))
    assert "Traceback" not in err, err
    assert "BrokenPipeError" not in err, err
    assert "Exception ignored" not in err, err
    assert code == BROKEN_PIPE_STATUS == 141


def test_help_into_a_closed_pipe_prints_no_traceback() -> None:
    code, err = _run_into_a_closed_pipe("--help")  # argparse itself ignores the failed write
    assert err == ""
    assert code in (0, BROKEN_PIPE_STATUS)


def test_an_open_pipe_still_gets_everything(state_file: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "actsparse.cli", "inspect", str(state_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("hook_state:") == 40
