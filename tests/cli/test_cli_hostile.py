"""Hostile and careless input to ``actsparse calibrate``, ``evaluate`` and ``sweep``: a model
directory that brings its own code, pickled weights or no tokenizer, a recipe that is a FIFO
or a JSON bomb, and a sweep whose output directory is in the way. Each ends in one line that
names the thing at fault, with nothing run, nothing read from standard input and nothing
lost on disk.

The models are the tiny BERT and Llama of ``tests/_text_models.py``, built in the test.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import threading
import time
import warnings
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


# --------------------------------------- 1: a model directory that brings its own code


class RecordingStdin(io.StringIO):
    """Standard input that answers yes to any prompt, and records that it was read."""

    def __init__(self) -> None:
        super().__init__("y\ny\ny\n")
        self.reads = 0

    def read(self, size: int | None = -1) -> str:
        self.reads += 1
        return super().read(size)

    def readline(self, size: int | None = -1) -> str:
        self.reads += 1
        return super().readline(size)

    def isatty(self) -> bool:
        return False


@pytest.fixture
def evil(bert: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A model directory whose config.json maps AutoConfig to a file of its own; the file
    writes a marker when it runs. Its model type is unknown to transformers, which then
    asks on standard input whether to run the code unless told not to."""
    model = tmp_path / "evil"
    shutil.copytree(bert, model)
    marker = tmp_path / "code-ran"
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evil-remote"
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil-remote'\n"
    )
    return model, marker


@pytest.mark.parametrize("command", ["calibrate", "evaluate", "sweep"])
def test_a_model_with_its_own_code_is_refused_without_running_it(
    command: str,
    evil: tuple[Path, Path],
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, marker = evil
    stdin = RecordingStdin()
    monkeypatch.setattr("sys.stdin", stdin)
    text = models["text"]
    argv = {
        "calibrate": ["calibrate", model, "--text", text, "--target", "0.5"],
        "evaluate": ["evaluate", model, models["state"], "--text", text],
        "sweep": ["sweep", model, "--text", text, *TIMING],
    }[command] + ["--out" if command != "evaluate" else "--json", tmp_path / "out"]
    code, out, err = run(argv, capsys)
    assert code == 1
    line = one_error_line(err, command)
    assert 'auto_map entry "AutoConfig": "configuration_evil.EvilConfig" (and 1 more)' in line
    assert "--trust-remote-code" in line
    assert "[y/N]" not in out
    assert stdin.reads == 0
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_tokenizers_own_code_is_refused_too(
    bert: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(bert, model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    argv = ["calibrate", model, "--text", text, "--target", "0.5", "--out", tmp_path / "s"]
    code, _, err = run(argv, capsys)
    assert code == 1
    line = one_error_line(err, "calibrate")
    assert "its tokenizer_config.json has an auto_map entry" in line
    assert '"AutoTokenizer": ["tokenization_evil.EvilTokenizer", null]' in line


@pytest.mark.parametrize("trust", [False, True])
def test_every_loader_is_told_whether_to_trust_remote_code(
    trust: bool,
    bert: Path,
    text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import transformers

    seen: dict[str, object] = {}
    for loader in ("AutoConfig", "AutoModel", "AutoTokenizer"):
        cls = getattr(transformers, loader)
        real = cls.from_pretrained.__func__

        def spy(klass: Any, *args: Any, _real: Any = real, _name: str = loader, **kw: Any) -> Any:
            seen[_name] = kw.get("trust_remote_code", "not given")
            return _real(klass, *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    argv = ["calibrate", bert, "--text", text, "--target", "0.5", "--out", tmp_path / "s"]
    code, _, err = run([*argv, *(["--trust-remote-code"] if trust else [])], capsys)
    assert code == 0, err
    assert seen == {"AutoConfig": trust, "AutoModel": trust, "AutoTokenizer": trust}


# --------------------------------------- 2: a failing sweep keeps an earlier sweep's files


@pytest.fixture
def earlier(tmp_path: Path) -> Path:
    """``o/`` as an earlier sweep left it (and a file of the user's)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "table.txt").write_text("the earlier table\n")
    (out / "state-0.3.safetensors").write_bytes(b"the earlier state")
    (out / "notes.txt").write_text("not the sweep's\n")
    return out


def sweep_03(
    out: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """``actsparse sweep MODEL --text t.txt --targets 0.3 --out o``: its status and stderr."""
    argv = ["sweep", models["bert"], "--text", models["text"], "--targets", "0.3", "--out", out]
    code, _, err = run([*argv, *TIMING], capsys)
    return code, err


def test_a_sweep_refused_for_a_directory_in_the_way_keeps_every_earlier_file(
    earlier: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (earlier / "recipe.json").mkdir()
    (earlier / "recipe.json" / "inside").write_text("kept\n")
    before = listing(earlier)
    code, err = sweep_03(earlier, models, capsys)
    assert code == 1
    line = one_error_line(err, "sweep")
    assert f"{str(earlier / 'recipe.json')!r} is a directory" in line
    assert listing(earlier) == before


def test_a_sweep_that_fails_moving_its_files_into_place_puts_every_earlier_file_back(
    earlier: Path,
    models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from actsparse.cli import _cmd_sweep

    before = listing(earlier)
    real_plot = _cmd_sweep.plot

    def plot_then_block(*args: Any, **kwargs: Any) -> bytes:
        # after the check at the start: the directory appears while the sweep runs
        (earlier / "recipe.json").mkdir()
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(_cmd_sweep, "plot", plot_then_block)
    code, err = sweep_03(earlier, models, capsys)
    assert code == 1
    line = one_error_line(err, "sweep")
    assert f"{str(earlier / 'recipe.json')!r}: it is a directory" in line
    assert "every file there is as it was" in line
    assert listing(earlier) == {**before, "recipe.json": None}


def test_a_sweep_that_cannot_move_a_file_names_it_and_puts_the_others_back(
    earlier: Path,
    models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = listing(earlier)
    real_replace = os.replace

    def full_disk_at_the_plot(source: Any, target: Any) -> None:
        if Path(target) == earlier / "quality_vs_sparsity.png":
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_at_the_plot)
    code, err = sweep_03(earlier, models, capsys)
    assert code == 1
    line = one_error_line(err, "sweep")
    assert f"{str(earlier / 'quality_vs_sparsity.png')!r}: No space left on device" in line
    assert listing(earlier) == before  # table.txt and the state were moved in, then put back


def test_a_sweep_replaces_its_earlier_files_and_keeps_the_others(
    earlier: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = sweep_03(earlier, models, capsys)
    assert code == 0, err
    assert sorted(p.name for p in earlier.iterdir()) == [
        "notes.txt",
        "quality_vs_sparsity.png",
        "recipe.json",
        "results.json",
        "state-0.3.safetensors",
        "table.txt",
    ]
    assert (earlier / "notes.txt").read_text() == "not the sweep's\n"
    assert (earlier / "table.txt").read_text() != "the earlier table\n"
    assert (earlier / "state-0.3.safetensors").read_bytes() != b"the earlier state"


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


def test_a_deep_or_long_numbered_config_json_is_refused_in_one_line(
    bert: Path, text: Path, tmp_path: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(bert, model)
    for content, message in (
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nests 5,001 levels deep"),
        ('{"vocab_size": ' + "6" * 5000 + "}", "holds a number 5,000 characters long"),
    ):
        (model / "config.json").write_text(content)
        argv = ["calibrate", model, "--text", text, "--target", "0.5", "--out", state_out]
        code, _, err = run(argv, capsys)
        assert code == 1
        assert f"{str(model)!r}: cannot read its config.json: it {message}" in one_error_line(
            err, "calibrate"
        )


# --------------------------------------- 9: a model directory without tokenizer files


@pytest.mark.parametrize(
    ("kind", "files"),
    [
        # transformers builds a BERT tokenizer of special tokens alone, which the class names
        ("bert", "its tokenizer (BertTokenizer) reads tokenizer.json or vocab.txt, and the "),
        # and fails to build a Llama one: the files any tokenizer reads are named
        ("llama", "none of tokenizer.json, vocab.txt, vocab.json, merges.txt, tokenizer.model"),
    ],
)
def test_a_model_without_tokenizer_files_is_refused(
    kind: str,
    files: str,
    text: Path,
    tmp_path: Path,
    state_out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tmp_path / kind
    (_text_models.tiny_bert() if kind == "bert" else _text_models.tiny_llama()).save_pretrained(
        model
    )
    assert not any(p.name.startswith(("tokenizer", "vocab")) for p in model.iterdir())
    argv = ["calibrate", model, "--text", text, "--target", "0.5", "--out", state_out]
    code, _, err = run(argv, capsys)
    assert code == 1
    line = one_error_line(err, "calibrate")
    assert f"{str(model)!r} has no tokenizer files: " in line
    assert files in line
    assert "tokenizer.save_pretrained(MODEL_DIR)" in line


# --------------------------------------- 13: pickled weights


class _Marker:
    """Unpickled, it would create the directory ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def test_pickled_weights_are_refused_in_actsparses_line_alone(
    bert: Path,
    text: Path,
    tmp_path: Path,
    state_out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tmp_path / "model"
    shutil.copytree(bert, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Marker(marker)}, protocol=4))
    argv = ["calibrate", model, "--text", text, "--target", "0.5", "--out", state_out]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(argv, capsys)
    assert [str(w.message) for w in caught] == []  # what would print before the line
    assert code == 1
    line = one_error_line(err, "calibrate")
    assert "its weights (pytorch_model.bin) are a pickle that torch.load(weights_only=True)" in line
    assert "nothing in it was run" in line
    assert not marker.exists()
