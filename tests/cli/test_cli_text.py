"""``actsparse calibrate``, ``evaluate`` and ``sweep`` on tiny transformers models, and the bad
input each refuses in one line.

The models are a BERT encoder and a Llama decoder with random weights, saved with
``save_pretrained`` to a temporary directory (see ``tests/_text_models.py``); every
command runs in-process in well under a second.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import _text_models

from actsparse import cli, serialize
from actsparse.core import parse_state_dict

TIMING = ["--repeat", "1"]  # one timed repetition: the tests check shapes, not speed


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: _text_models.save_model(root / kind, kind) for kind in ("bert", "llama")} | {
        "text": _text_models.write_text(root / "text.txt")
    }


@pytest.fixture
def bert(models: dict[str, Path]) -> Path:
    return models["bert"]


@pytest.fixture
def llama(models: dict[str, Path]) -> Path:
    return models["llama"]


@pytest.fixture
def text(models: dict[str, Path]) -> Path:
    return models["text"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    """The one line a refused command prints (after argparse's usage line, if any)."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"actsparse {command}: error: "), err
    return lines[0]


def thresholds(path: Path) -> dict[str, float]:
    parsed = parse_state_dict(serialize.load(path), names_only=True)
    return {name: record.threshold.threshold for name, record in parsed.layers.items()}


BERT_LAYERS = [
    f"encoder.layer.{i}.{part}.dense" for i in range(2) for part in ("intermediate", "output")
]


# ------------------------------------------------------------------ calibrate


def test_calibrate_writes_a_state_and_prints_each_layer(
    bert: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "state.safetensors"
    argv = ["calibrate", bert, "--text", text, "--target", "0.5", "--out", out]
    code, stdout, err = run([*argv, "--allocation", "uniform"], capsys)
    assert code == 0, err
    assert err == ""  # no progress bar off a terminal, no library chatter
    assert list(thresholds(out)) == BERT_LAYERS
    for name in BERT_LAYERS:  # every layer at the target
        row = next(line for line in stdout.splitlines() if line.startswith(name))
        assert row.split()[2:] == ["50.0%", "yes"], row
    assert "24 passages" in stdout
    assert f"wrote {out}" in stdout


def test_calibrate_a_causal_model_by_preset_and_options(
    llama: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "llama.safetensors"
    argv = ["calibrate", llama, "--text", text, "--target", "0.4", "--out", out]
    argv += ["--layers", "llama", "--max-tokens", "8", "--batch", "5", "--max-passages", "10"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert len(thresholds(out)) == 14  # q, k, v, o, gate, up, down in two blocks
    assert "10 passages" in stdout
    assert "at most 8 per passage" in stdout
    assert "2 batches" in stdout


def test_calibrate_layers_by_regular_expression(
    bert: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "one.safetensors"
    pattern = r"encoder\.layer\.0\.intermediate\.dense"
    argv = ["calibrate", bert, "--text", text, "--target", "0.3", "--out", out, "--layers", pattern]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert list(thresholds(out)) == ["encoder.layer.0.intermediate.dense"]


def test_calibrate_shows_a_progress_bar_when_asked(
    bert: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "state.safetensors"
    argv = ["calibrate", bert, "--text", text, "--target", "0.5", "--out", out, "--progress"]
    code, _, err = run(argv, capsys)
    assert code == 0
    assert "calibrating" in err
    assert "batch" in err


# ------------------------------------------------------------------ evaluate


@pytest.fixture(scope="module")
def bert_state(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("states") / "bert.safetensors"
    argv = ["calibrate", models["bert"], "--text", models["text"], "--target", "0.5"]
    argv += ["--allocation", "uniform"]  # every layer at 50%
    assert cli.main([str(a) for a in [*argv, "--out", out]]) == 0
    return out


@pytest.fixture(scope="module")
def llama_state(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("states") / "llama.safetensors"
    argv = ["calibrate", models["llama"], "--text", models["text"], "--target", "0.4"]
    assert cli.main([str(a) for a in [*argv, "--out", out]]) == 0
    return out


def test_evaluate_an_encoder(
    bert: Path, bert_state: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    argv = ["evaluate", bert, bert_state, "--text", text, "--json", out, *TIMING]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert err == ""
    result = json.loads(out.read_text())
    assert list(result["layers"]) == BERT_LAYERS
    assert abs(result["sparsity"] - 0.5) < 0.05  # calibrated on the same text
    assert all(abs(value - 0.5) < 0.08 for value in result["layers"].values())
    assert 0.9 < result["cosine"] <= 1.0 + 1e-6
    assert result["time_ratio"] > 0
    assert "perplexity" not in result
    assert "mean cosine" in stdout
    assert "all layers" in stdout
    assert "time over the dense" in stdout


def test_evaluate_a_causal_model_on_held_out_passages_with_the_auto_kernel(
    llama: Path, llama_state: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    argv = ["evaluate", llama, llama_state, "--text", text, "--json", out, "--split", "odd"]
    code, stdout, err = run([*argv, "--kernel", "auto", *TIMING], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["passages"] == 12
    assert result["kernel"] == "auto"
    assert len(result["layers"]) == 14
    assert abs(result["sparsity"] - 0.4) < 0.08
    assert result["perplexity"] > 1
    assert result["dense_perplexity"] > 1
    assert result["perplexity_change"] == pytest.approx(
        result["perplexity"] / result["dense_perplexity"] - 1
    )
    assert "cosine" not in result
    assert "perplexity" in stdout


def test_evaluate_shows_a_progress_bar_for_each_loop_when_asked(
    bert: Path, bert_state: Path, text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", bert, bert_state, "--text", text, "--progress", *TIMING]
    code, _, err = run(argv, capsys)
    assert code == 0
    for loop in ("dense model", "sparse model", "timing"):
        assert f"{loop}:" in err, err


def test_evaluate_counts_the_same_zeros_with_any_kernel(
    bert: Path, bert_state: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = {}
    for kernel in ("dense", "cpu_sparse"):
        out = tmp_path / f"{kernel}.json"
        argv = ["evaluate", bert, bert_state, "--text", text, "--json", out, "--kernel", kernel]
        code, _, err = run([*argv, *TIMING], capsys)
        assert code == 0, err
        found[kernel] = json.loads(out.read_text())
    assert found["dense"]["layers"] == found["cpu_sparse"]["layers"]
    assert found["dense"]["cosine"] == pytest.approx(found["cpu_sparse"]["cosine"], abs=1e-4)


@pytest.mark.parametrize("kernel", ["cpu_sparse_int8", "cpu_sparse_int4"])
def test_evaluate_runs_a_lossy_kernel_named_by_kernel(
    kernel: str,
    bert: Path,
    bert_state: Path,
    text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    found = {}
    for name in ("dense", kernel):
        out = tmp_path / f"{name}.json"
        argv = ["evaluate", bert, bert_state, "--text", text, "--json", out, "--kernel", name]
        code, _, err = run([*argv, *TIMING], capsys)
        assert code == 0, err
        found[name] = json.loads(out.read_text())
    # the same thresholds; the quantized weights move the later layers' inputs a little
    dense, lossy = found["dense"]["layers"], found[kernel]["layers"]
    assert set(lossy) == set(dense)
    for name, zeroed in dense.items():
        assert lossy[name] == pytest.approx(zeroed, abs=0.02), name
    assert found[kernel]["cosine"] == pytest.approx(found["dense"]["cosine"], abs=0.05)


# ------------------------------------------------------------------ sweep


def test_sweep_calibrates_once_and_writes_every_file(
    bert: Path,
    text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import actsparse.hooks

    calls: list[Any] = []
    real = actsparse.hooks.sparsify

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(actsparse.hooks, "sparsify", counted)
    out = tmp_path / "sweep"
    argv = ["sweep", bert, "--text", text, "--targets", "0.5,0.2,0.35", "--out", out, *TIMING]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert len(calls) == 1  # one calibration; the other targets are retargeted
    names = sorted(path.name for path in out.iterdir())
    assert names == [
        "quality_vs_sparsity.png",
        "recipe.json",
        "results.json",
        "state-0.2.safetensors",
        "state-0.35.safetensors",
        "state-0.5.safetensors",
        "table.txt",
    ]
    assert (out / "quality_vs_sparsity.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((out / "results.json").read_text())
    assert [row["target"] for row in results["rows"]] == [0.2, 0.35, 0.5]
    assert results["passages"] == {"calibration": 12, "evaluation": 12}
    for row in results["rows"]:
        assert abs(row["sparsity"] - row["target"]) < 0.08  # held-out passages
        assert {"layers", "cosine", "time_ratio", "expected_sparsity", "state"} <= set(row)
        assert set(thresholds(out / row["state"])) == set(BERT_LAYERS)
    table = (out / "table.txt").read_text()
    assert table.strip() in stdout
    assert len(table.strip().splitlines()) == 4  # a header and one row per target
    levels = {row["target"]: thresholds(out / row["state"]) for row in results["rows"]}
    assert all(levels[0.2][n] < levels[0.35][n] < levels[0.5][n] for n in BERT_LAYERS)


def test_the_recipe_replays_the_sweeps_calibration(
    llama: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", llama, "--text", text, "--targets", "0.2,0.4", "--out", out, *TIMING]
    argv += ["--max-tokens", "16", "--batch", "4", "--layers", r"model\.layers\.\d+\.mlp\..*"]
    code, _stdout, err = run(argv, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert "dense_perplexity" in results
    assert "perplexity" in results["rows"][0]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["target"] == results["recipe"]["target"]
    assert recipe["split"] == "even"
    assert recipe["max_tokens"] == 16
    assert recipe["batch"] == 4
    replayed = tmp_path / "replayed.safetensors"
    code, _, err = run(
        ["calibrate", llama, "--text", text, "--recipe", out / "recipe.json", "--out", replayed],
        capsys,
    )
    assert code == 0, err
    assert err == ""
    assert thresholds(replayed) == thresholds(out / f"state-{recipe['target']:g}.safetensors")
    # an option given on the command line wins over the recipe's
    other = tmp_path / "other.safetensors"
    argv = ["calibrate", llama, "--text", text, "--recipe", out / "recipe.json", "--out", other]
    code, _, err = run([*argv, "--target", "0.2"], capsys)
    assert code == 0, err
    assert thresholds(other) == thresholds(out / "state-0.2.safetensors")


def test_a_recipe_on_another_text_warns(
    bert: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {"format": "actsparse-recipe", "version": 1, "target": 0.3, "text_sha256": "0" * 64}
        )
    )
    out = tmp_path / "state.safetensors"
    code, _, err = run(
        ["calibrate", bert, "--text", text, "--recipe", recipe, "--out", out], capsys
    )
    assert code == 0
    assert err.startswith("actsparse calibrate: warning: ")
    assert "SHA-256 differs" in err
    assert list(thresholds(out)) == BERT_LAYERS


# ------------------------------------------------------------------ bad input


def calibrate_argv(model: Path, text: Path, out: Path, *extra: Any) -> list[Any]:
    return ["calibrate", model, "--text", text, "--target", "0.5", "--out", out, *extra]


@pytest.fixture
def state_out(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "state.safetensors"
    yield out
    # no state file, and no temporary file beside it, after a refused call
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".state")] == []


def test_a_missing_model_directory(
    text: Path, tmp_path: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(calibrate_argv(tmp_path / "absent", text, state_out), capsys)
    assert code == 1
    assert "does not exist" in one_error_line(err, "calibrate")


def test_a_directory_that_is_not_a_transformers_model(
    text: Path, tmp_path: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"\0" * 16)
    code, _, err = run(calibrate_argv(empty, text, state_out), capsys)
    assert code == 1
    assert "is not a transformers model directory: it has no config.json" in one_error_line(
        err, "calibrate"
    )
    (empty / "config.json").write_text("{not json")
    code, _, err = run(calibrate_argv(empty, text, state_out), capsys)
    assert code == 1
    assert "cannot read its config.json" in one_error_line(err, "calibrate")


def test_a_model_file_instead_of_a_directory(
    text: Path, tmp_path: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\0")
    code, _, err = run(calibrate_argv(model, text, state_out), capsys)
    assert code == 1
    assert "is not a directory" in one_error_line(err, "calibrate")


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"])
def test_an_empty_text_file(
    bert: Path, tmp_path: Path, state_out: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    code, _, err = run(calibrate_argv(bert, empty, state_out), capsys)
    assert code == 1
    assert "holds no text" in one_error_line(err, "calibrate")


def test_a_missing_or_binary_text_file(
    bert: Path, tmp_path: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(calibrate_argv(bert, tmp_path / "absent.txt", state_out), capsys)
    assert code == 1
    assert "does not exist" in one_error_line(err, "calibrate")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00text")
    code, _, err = run(calibrate_argv(bert, binary, state_out), capsys)
    assert code == 1
    assert "is not UTF-8 text" in one_error_line(err, "calibrate")


@pytest.mark.parametrize("target", ["1", "1.5", "-0.1", "nan", "half"])
def test_a_target_outside_the_unit_interval(
    bert: Path, text: Path, state_out: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    argv = ["calibrate", bert, "--text", text, "--target", target, "--out", state_out]
    code, _, err = run(argv, capsys)
    assert code == 2
    line = one_error_line(err, "calibrate")
    assert "outside [0, 1)" in line or "is not a number" in line


def test_sweep_targets_outside_the_unit_interval(
    bert: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    for targets, message in (("0.3,1.0", "outside [0, 1)"), ("0.3,0.3", "repeat")):
        code, _, err = run(
            ["sweep", bert, "--text", text, "--targets", targets, "--out", out], capsys
        )
        assert code == 2
        assert message in one_error_line(err, "sweep")
    assert not out.exists()


def test_no_target_at_all(
    bert: Path, text: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["calibrate", bert, "--text", text, "--out", state_out], capsys)
    assert code == 2
    assert "give --target" in one_error_line(err, "calibrate")


def test_a_preset_that_does_not_match_the_models_layers(
    bert: Path, llama: Path, text: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(calibrate_argv(bert, text, state_out, "--layers", "llama"), capsys)
    assert code == 2
    line = one_error_line(err, "calibrate")
    assert "--layers llama: the preset does not match the layers of this BertModel" in line
    assert "preset 'bert' does" in line
    code, _, err = run(calibrate_argv(llama, text, state_out, "--layers", "bert"), capsys)
    assert code == 2
    assert "preset 'llama' does" in one_error_line(err, "calibrate")


def test_a_layer_pattern_that_selects_nothing_or_does_not_compile(
    bert: Path, text: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(calibrate_argv(bert, text, state_out, "--layers", "dense"), capsys)
    assert code == 2
    line = one_error_line(err, "calibrate")
    assert "matches the full name of no layer" in line
    assert "encoder.layer.0" in line
    code, _, err = run(calibrate_argv(bert, text, state_out, "--layers", "(unclosed"), capsys)
    assert code == 2
    assert "valid regular expression" in one_error_line(err, "calibrate")


def test_more_tokens_than_the_model_takes(
    bert: Path, text: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = calibrate_argv(bert, text, state_out, "--max-tokens", "65")
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "more than the 64 positions" in one_error_line(err, "calibrate")


def test_a_state_file_made_for_another_model(
    llama: Path, bert_state: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    argv = ["evaluate", llama, bert_state, "--text", text, "--json", out]
    code, _, err = run(argv, capsys)
    assert code == 1
    line = one_error_line(err, "evaluate")
    assert "was made for another model: 4 of its 4 layers are not in" in line
    assert "'encoder.layer.0.intermediate.dense'" in line
    assert "and 1 more" in line
    assert not out.exists()


def test_a_state_file_that_is_not_one(
    bert: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a state file at all")
    for state, message in ((junk, "junk.safetensors"), (tmp_path / "absent", "does not exist")):
        code, _, err = run(["evaluate", bert, state, "--text", text], capsys)
        assert code == 1
        assert message in one_error_line(err, "evaluate")


def test_an_unknown_kernel(
    bert: Path, bert_state: Path, text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["evaluate", bert, bert_state, "--text", text, "--kernel", "gpu"], capsys)
    assert code == 2
    line = one_error_line(err, "evaluate")
    assert "--kernel gpu: unknown kernel 'gpu'" in line
    assert "'auto' picks the fastest exact kernel" in line


def test_output_paths_that_cannot_be_written(
    bert: Path, bert_state: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out, message in (
        (tmp_path / "missing" / "state.safetensors", "does not exist"),
        (a_file / "state.safetensors", "is not a directory"),
        (tmp_path, "it is a directory"),
    ):
        code, _, err = run(calibrate_argv(bert, text, out), capsys)
        assert code == 1
        line = one_error_line(err, "calibrate")
        assert "cannot write the state file" in line
        assert message in line
    code, _, err = run(
        ["evaluate", bert, bert_state, "--text", text, "--json", a_file / "x.json"], capsys
    )
    assert code == 1
    assert "cannot write the JSON results" in one_error_line(err, "evaluate")
    code, _, err = run(["sweep", bert, "--text", text, "--out", a_file], capsys)
    assert code == 1
    assert "exists and is not a directory" in one_error_line(err, "sweep")
    code, _, err = run(["sweep", bert, "--text", text, "--out", a_file / "sub" / "dir"], capsys)
    assert code == 1
    assert "is not a directory" in one_error_line(err, "sweep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_failure_half_way_leaves_no_file(
    bert: Path,
    text: Path,
    state_out: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import actsparse.hooks

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(actsparse.hooks, "sparsify", interrupted)
    code, _, err = run(calibrate_argv(bert, text, state_out), capsys)
    assert code == 130
    assert "Traceback" not in err


def test_a_sweep_that_fails_writes_nothing(
    bert: Path,
    text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from actsparse.cli import _outputs

    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise OSError(28, "No space left on device")

    out = tmp_path / "sweep"
    monkeypatch.setattr(_outputs, "write_atomic", broken)
    code, _, err = run(["sweep", bert, "--text", text, "--out", out, *TIMING], capsys)
    assert code == 1
    line = one_error_line(err, "sweep")
    assert "cannot write the sweep's files" in line
    assert f"{str(out / 'table.txt')!r}: No space left on device" in line  # the file at fault
    assert not out.exists()  # the state files written before the failure are removed


def test_a_bad_recipe(
    bert: Path, text: Path, tmp_path: Path, state_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.json"
    for content, message in (
        ("{", "is not JSON"),
        ('{"target": 0.5}', "is not an actsparse recipe"),
        ('{"format": "actsparse-recipe", "version": 9}', "version 9"),
        ('{"format": "actsparse-recipe", "version": 1, "target": 1.5}', "target: target 1.5"),
        ('{"format": "actsparse-recipe", "version": 1, "batch": 2.5}', "not an integer"),
        ('{"format": "actsparse-recipe", "version": 1, "speed": 1}', "unknown key(s) 'speed'"),
    ):
        recipe.write_text(content)
        argv = ["calibrate", bert, "--text", text, "--recipe", recipe, "--out", state_out]
        code, _, err = run(argv, capsys)
        assert code == 1, content
        assert message in one_error_line(err, "calibrate"), content


@pytest.mark.parametrize("command", ["calibrate", "evaluate", "sweep"])
def test_without_transformers_the_error_names_the_extra(
    command: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    argv = {
        "calibrate": ["calibrate", "m", "--text", "t", "--target", "0.5", "--out", "s"],
        "evaluate": ["evaluate", "m", "s", "--text", "t"],
        "sweep": ["sweep", "m", "--text", "t", "--out", tmp_path / "out"],
    }[command]
    code, _, err = run(argv, capsys)
    assert code == 1
    line = one_error_line(err, command)
    assert f"actsparse {command} needs transformers: " in line
    assert 'pip install "actsparse-cli[hf]"' in line


def test_the_allocations_are_sparsifys_own() -> None:
    from actsparse import hooks
    from actsparse.cli import _recipe

    assert _recipe.ALLOCATIONS == hooks.ALLOCATIONS
    assert [_recipe.allocation(name) for name in hooks.ALLOCATIONS] == list(hooks.ALLOCATIONS)
    assert "greedy_exact" in hooks.ALLOCATIONS
    with pytest.raises(Exception, match="'balanced' is not one of uniform, greedy, greedy_exact"):
        _recipe.allocation("balanced")
