"""Hostile and careless input to ``actsparse calibrate``, ``evaluate`` and ``sweep``: a recipe
that is a FIFO or a JSON bomb. Each ends in one line that names the thing at fault.

The models are the tiny BERT and Llama of ``tests/_text_models.py``, built in the test.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import _text_models

from actsparse import cli

posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs")
TIMING = ["--repeat", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    bert = _text_models.save_model(root / "bert", "bert")
    text = _text_models.write_text(root / "text.txt")
    state = root / "bert.safetensors"
    argv = ["calibrate", bert, "--text", text, "--target", "0.5", "--out", state]
    assert cli.main([str(a) for a in argv]) == 0
    return {"bert": bert, "text": text, "state": state}


@pytest.fixture
def bert(models: dict[str, Path]) -> Path:
    return models["bert"]


@pytest.fixture
def text(models: dict[str, Path]) -> Path:
    return models["text"]


def run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    """The one line a refused command prints on standard error, and nothing else."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"actsparse {command}: error: "), err
    return lines[0]


def listing(directory: Path) -> dict[str, bytes | None]:
    """Every entry below ``directory``: a file's bytes, or None for a directory."""
    return {
        str(path.relative_to(directory)): None if path.is_dir() else path.read_bytes()
        for path in sorted(directory.rglob("*"))
    }


# --------------------------------------- 3: recipes that are FIFOs or JSON bombs


@pytest.fixture
def state_out(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "state.safetensors"
    yield out
    assert not out.exists()


def calibrate_with_recipe(model: Path, text: Path, recipe: Path, out: Path) -> list[Any]:
    return ["calibrate", model, "--text", text, "--recipe", recipe, "--out", out]


@posix_only
def test_a_recipe_that_is_a_fifo_is_refused_at_once(
    bert: Path, text: Path, tmp_path: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "recipe.json"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock() -> None:
        # if the command waits for a writer after all, end its wait after 5 s (with EOF)
        if done.wait(5):
            return
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.05)

    watchdog = threading.Thread(target=unblock, daemon=True)
    watchdog.start()
    start = time.monotonic()
    try:
        code, _, err = run(calibrate_with_recipe(bert, text, fifo, state_out), capsys)
    finally:
        done.set()
        watchdog.join()
    assert time.monotonic() - start < 5
    assert code == 1
    line = one_error_line(err, "calibrate")
    assert f"recipe {str(fifo)!r} is not a regular file (it is a FIFO)" in line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "is 200,000 bytes, over the limit of 65,536"),
        ("[" * 30_000 + "]" * 30_000, "nests 30,000 levels deep, over the limit of 32"),
        (
            '{"format": "actsparse-recipe", "version": 1, "batch": ' + "9" * 5000 + "}",
            "holds a number 5,000 characters long, over the limit of 64",
        ),
        (
            '{"format": "actsparse-recipe", "version": 1, "target": 0.' + "3" * 100 + "}",
            "holds a number 102 characters long, over the limit of 64",
        ),
    ],
    ids=["large", "deep", "long-integer", "long-float"],
)
def test_a_recipe_beyond_a_bound_is_refused_in_one_line(
    content: str,
    message: str,
    bert: Path,
    text: Path,
    tmp_path: Path,
    state_out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(content)
    code, _, err = run(calibrate_with_recipe(bert, text, recipe, state_out), capsys)
    assert code == 1
    assert f"recipe {str(recipe)!r} {message}" in one_error_line(err, "calibrate")


def test_brackets_and_digits_inside_a_recipes_strings_do_not_count(
    bert: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.json"
    body = {"format": "actsparse-recipe", "version": 1, "target": 0.3, "made_by": "[{" * 40}
    body["model"] = "7" * 200
    recipe.write_text(json.dumps(body))
    out = tmp_path / "state.safetensors"
    code, _, err = run(calibrate_with_recipe(bert, text, recipe, out), capsys)
    assert code == 0, err
    assert out.exists()
